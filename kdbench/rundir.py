"""A run directory: its layout and its disk discipline, in one place.

::

    <run dir>/results.sqlite            the store (only the driver writes it)
    <run dir>/grid.yaml, cells.json     the grid last run here and its cells' ids
    <run dir>/jobs.json                 what was submitted where (--detach)
    <run dir>/.kdbench.lock             one driver at a time
    <run dir>/cells/<id>/               config.json, result.json, log.txt, metrics.jsonl, ...
    <run dir>/teachers/<id>.pt          trained teachers (+ .sha256), shared by the cells
    <run dir>/softlabels/<id>/          soft-label banks replayed by cells (kdbench/engine/softlabels.py)

Workers only write their own cell directory (and the teacher cache, under its lock); the driver
imports what they wrote into the store. Every write is atomic (temp file + fsync + rename).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

from kdbench.artifacts import disk_error, write_bytes_atomic, write_json_atomic
from kdbench.cells import Cell, CellResult
from kdbench.errors import KdbenchError
from kdbench.store import Store


class RunDirBusy(KdbenchError):
    """Another driver holds the run directory."""


class RunLock:
    """One driver per run directory: an ``fcntl`` lock on ``<run dir>/.kdbench.lock``.

    The lock file holds the host and PID of the driver that holds it. The OS releases the
    lock when that process dies, however it dies, so a stale file needs no cleanup. Workers
    (local, Slurm, Ray) never take it: they only write their own cell directory.
    """

    NAME = ".kdbench.lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise not_writable(self.path.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder: list[str] = []
            for _ in range(40):  # the holder writes who it is just after it takes the lock
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                if len(holder) >= 2:
                    break
                time.sleep(0.025)
            os.close(fd)
            who = f"host {holder[0]}, PID {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunDirBusy(
                f"run directory {self.path.parent} is in use by another `kdbench run` ({who}); "
                "wait for it to finish or stop it: two drivers would train every cell twice"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{platform.node()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def not_writable(directory: Path, e: OSError) -> KdbenchError:
    """The error for an output directory kdbench cannot write (naming the one that refuses)."""
    why = e.strerror or str(e)
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    extra = f" (so {directory} cannot be created)" if existing != Path(directory) else ""
    return KdbenchError(
        f"output directory {existing} is not writable ({why}){extra}; "
        "fix its permissions or choose another with --out"
    )


class RunDir:
    """A run directory (see the module docstring)."""

    STORE = "results.sqlite"
    JOBS = "jobs.json"

    def __init__(self, path: Path | str):
        self.path = Path(path)

    # ---------------------------------------------------------------- layout
    def cell_dir(self, cell_id: str) -> Path:
        return self.path / "cells" / cell_id

    def result_file(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "result.json"

    @property
    def teachers(self) -> Path:
        return self.path / "teachers"

    @property
    def softlabels(self) -> Path:
        return self.path / "softlabels"

    # ---------------------------------------------------------------- discipline
    def lock(self) -> RunLock:
        return RunLock(self.path)

    def check_writable(self) -> None:
        """Fail (exit 2) before anything is written when the directory cannot take new files.

        ``O_TMPFILE`` makes a nameless file, so the probe leaves nothing behind even when it
        works; it also catches read-only mounts, which root's permission bypass does not.
        """
        flag = getattr(os, "O_TMPFILE", 0)
        try:
            if flag:
                os.close(os.open(self.path, flag | os.O_WRONLY, 0o600))
            elif not os.access(self.path, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise not_writable(self.path, e) from None
            # EOPNOTSUPP/EISDIR/EINVAL: the filesystem has no O_TMPFILE; later writes will tell

    def write_if_changed(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically unless it already holds ``data`` (a finished rerun writes nothing)."""
        path = self.path / name
        try:
            if path.read_bytes() == data:
                return
        except OSError:
            pass
        try:
            write_bytes_atomic(path, data)
        except OSError as e:
            raise disk_error(path, e) from None

    # ---------------------------------------------------------------- the store
    def open_store(self) -> Store:
        try:
            return Store(self.path / self.STORE)
        except sqlite3.OperationalError as e:
            raise KdbenchError(f"cannot open {self.path / self.STORE}: {e}") from None

    def done_in_store(self) -> set[str]:
        """Ids of cells the store already records as done (read without writing)."""
        db = self.path / self.STORE
        if not db.exists():
            return set()
        store = Store.read_only(db)
        try:
            return {i for i, s in store.status().items() if s == "done"}
        finally:
            store.close()

    def done_on_disk(self, cells: list[Cell]) -> set[str]:
        """Ids of cells already done, read from the store and result files without writing."""
        done = self.done_in_store()
        for c in cells:
            if c.id not in done and (self.read_result(c.id) or {}).get("status") == "done":
                done.add(c.id)
        return done

    def read_result(self, cell_id: str) -> dict[str, Any] | None:
        """A cell's ``result.json`` as written, or None (absent, unreadable or foreign)."""
        try:
            data = json.loads(self.result_file(cell_id).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def record(self, store: Store, result: CellResult) -> None:
        """Record ``result`` (and the cell's per-epoch rows) in ``store``."""
        store.import_cell(self.cell_dir(result.cell.id), result.to_dict())

    def import_results(self, store: Store, cells: list[Cell]) -> None:
        """Record every result file on disk that the store does not yet hold as done (and that is
        not older than the attempt the store holds: a killed worker leaves no file of its own)."""
        status = store.status()
        tries = {r["id"]: r["attempts"] for r in store.cells()} if status else {}
        for c in cells:
            result = self.read_result(c.id) if status.get(c.id) != "done" else None
            if result is None:
                continue
            try:
                if result.get("status") == "done" or int(result.get("attempt", 1)) >= tries.get(c.id, 0):
                    store.import_cell(self.cell_dir(c.id), result)
            except (KeyError, TypeError, ValueError):
                pass  # never half-written, but a foreign file must not stop the sweep
        for f in self.teachers.glob("*/result.json"):
            try:
                r = json.loads(f.read_text())
                store.record_teacher(r["teacher"], r["metrics"], r.get("env", {}), r.get("wall_s", 0.0))
            except (ValueError, KeyError):
                pass

    # ---------------------------------------------------------------- submitted jobs
    def read_jobs(self) -> dict[str, dict[str, Any]]:
        """Cell id -> {executor, job, attempt, submitted, by} of cells handed to an outside scheduler."""
        try:
            data = json.loads((self.path / self.JOBS).read_text())
        except (OSError, ValueError):
            return {}  # never half-written (atomic); a foreign file must not stop the sweep
        return data if isinstance(data, dict) else {}

    def record_submitted(self, executor: str, ids: dict[str, str], attempts: dict[str, int]) -> None:
        jobs, now = self.read_jobs(), time.time()
        by = f"{platform.node()}:{os.getpid()}"
        for cid, jid in ids.items():
            jobs[cid] = {"executor": executor, "job": jid, "attempt": attempts[cid]} | {
                "submitted": now,
                "by": by,
            }
        write_json_atomic(self.path / self.JOBS, jobs)
