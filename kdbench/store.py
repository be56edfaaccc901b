"""The results store: one SQLite file per run directory (stdlib sqlite3).

Only the driver process writes it. Workers leave ``cells/<id>/result.json`` (atomic) and the
driver imports those files, so a crash between the two loses nothing: the next run imports
whatever result files exist before deciding what is left to do. A cell's per-epoch rows
(``metrics.jsonl``) are imported with its result, in the same transaction, and the grid last
run here is kept beside them, so reports read the store alone.

Journal: SQLite's WAL keeps its index in shared memory, which only processes on one host
share; a run directory on a network filesystem (NFS, Lustre, GPFS, CIFS, ...) read from a
login node while the driver runs on a compute node would be misread. There the store uses a
rollback journal (``journal_mode=DELETE``), elsewhere WAL. ``KDBENCH_SQLITE_JOURNAL=wal|delete``
forces either.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdbench.artifacts import write_json_atomic  # noqa: F401 - the one atomic JSON writer
from kdbench.errors import KdbenchError

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,              -- pending | done | failed
    config TEXT NOT NULL,              -- the cell dict (JSON)
    metrics TEXT,                      -- JSON
    env TEXT,                          -- JSON: versions, git sha, host, device
    error TEXT,
    wall_s REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE IF NOT EXISTS meta (      -- facts about the run directory (e.g. threads)
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS epochs (    -- a cell's per-epoch rows (stage "train" of metrics.jsonl)
    cell_id TEXT NOT NULL,
    seq INTEGER NOT NULL,              -- order in metrics.jsonl
    row TEXT NOT NULL,                 -- JSON
    PRIMARY KEY (cell_id, seq)
);
CREATE TABLE IF NOT EXISTS teachers (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    metrics TEXT,
    env TEXT,
    wall_s REAL,
    updated REAL NOT NULL DEFAULT (strftime('%s','now'))
);
"""


def _plain(obj: Any) -> Any:
    """A record (kdbench.cells: Cell, TeacherSpec, CellResult) as its JSON dict; anything else as is."""
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else obj


def _json_default(obj: Any) -> Any:
    plain = _plain(obj)
    return str(obj) if plain is obj else plain


#: filesystem types (``/proc/mounts``) whose files processes on several hosts open
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "beegfs", "fuse.glusterfs")
JOURNAL_ENV = "KDBENCH_SQLITE_JOURNAL"
META_GRID = "grid.yaml"  # meta key: the text of the grid last run here
META_CELLS = "cells.json"  # meta key: the ids of its cells (JSON list)
#: meta key: the last ``kdbench run`` pass that ran cells here (JSON: wall_s, finished, counts)
META_LAST_RUN = "last_run.json"


class JournalModeError(KdbenchError):
    """``KDBENCH_SQLITE_JOURNAL`` holds something other than wal or delete."""


def _unescape_mount(path: str) -> str:
    """``/proc/mounts`` writes a space in a mount point as ``\\040`` (and tab, newline, backslash)."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, ch)
    return path


def filesystem_type(path: Path, mounts: Path = Path("/proc/mounts")) -> str | None:
    """The type of the filesystem holding ``path`` (the longest mount point above it); None if unknown."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())
    best, fstype = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = _unescape_mount(parts[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, parts[2]
    return fstype


def journal_mode(directory: Path) -> str:
    """``"delete"`` (rollback journal) on a network filesystem, ``"wal"`` elsewhere, unless forced
    by ``KDBENCH_SQLITE_JOURNAL``."""
    forced = os.environ.get(JOURNAL_ENV, "").strip().lower()
    if forced:
        if forced not in ("wal", "delete"):
            raise JournalModeError(
                f"{JOURNAL_ENV}={forced!r}: use wal (one host) or delete (a shared filesystem), "
                "or unset it to detect the filesystem"
            )
        return forced
    fstype = filesystem_type(directory)
    return "delete" if fstype is not None and fstype.lower() in NETWORK_FS else "wal"


def read_epoch_rows(path: Path) -> list[dict]:
    """The student's per-epoch rows (stage "train") of a ``metrics.jsonl``; [] when absent.

    A line cut by a crash is skipped.
    """
    rows: list[dict] = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("stage", "train") == "train":
            rows.append(row)
    return rows


class Store:
    """Thin, transactional access to ``results.sqlite``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = journal_mode(self.path.parent)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.journal = str(self.db.execute(f"PRAGMA journal_mode={mode.upper()}").fetchone()[0]).lower()
        self.db.executescript(SCHEMA)
        self.db.commit()

    @classmethod
    def open_existing(cls, path: Path) -> Store:
        """Open a store that must exist; read-only (writing nothing) when its directory is."""
        path = Path(path)
        if not path.exists():
            raise KdbenchError(f"no results store at {path}; run `kdbench run GRID` first")
        if not os.access(path.parent, os.W_OK) or not os.access(path, os.W_OK):
            return cls.read_only(path)
        return cls(path)

    @classmethod
    def read_only(cls, path: Path, immutable: bool | None = None) -> Store:
        """Open for reading only. ``immutable`` (default: when the directory is not writable)
        also skips SQLite's WAL index files, so nothing at all is written (an archived run)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        if immutable is None:
            immutable = not os.access(self.path.parent, os.W_OK)
        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{flags}", uri=True, timeout=30)
        self.journal = "read-only"
        return self

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.db:
            yield self.db

    def close(self) -> None:
        self.db.close()

    # ---- cells
    def add_pending(self, cells: list[dict]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO cells (id, status, config) VALUES (?, 'pending', ?)",
                [(d["id"], json.dumps(d, sort_keys=True)) for d in map(_plain, cells)],
            )
            # a row label is presentation, not identity: cells stored under an older label of
            # the same row (a newer kdbench names rows differently) take the plan's, so one row
            # never splits in two
            rows = [(d["method"]["label"], d["id"], d["method"]["label"]) for d in map(_plain, cells)]
            db.executemany(
                "UPDATE cells SET config = json_set(config, '$.method.label', ?) "
                "WHERE id = ? AND json_extract(config, '$.method.label') IS NOT ?",
                rows,
            )

    def record(self, result: dict, epochs: list[dict] | None = None) -> None:
        """Insert or replace a cell's outcome from its result.json content; ``epochs`` (its
        per-epoch rows, see :func:`read_epoch_rows`) replace those stored, in the same transaction."""
        result = _plain(result)
        cell = _plain(result["cell"])
        with self.transaction() as db:
            if epochs is not None:
                db.execute("DELETE FROM epochs WHERE cell_id = ?", (cell["id"],))
                db.executemany(
                    "INSERT INTO epochs (cell_id, seq, row) VALUES (?, ?, ?)",
                    [(cell["id"], i, json.dumps(r, default=_json_default)) for i, r in enumerate(epochs)],
                )
            db.execute(
                """INSERT INTO cells (id, status, config, metrics, env, error, wall_s, attempts)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET status=excluded.status, config=excluded.config,
                     metrics=excluded.metrics, env=excluded.env, error=excluded.error,
                     wall_s=excluded.wall_s, attempts=excluded.attempts,
                     updated=strftime('%s','now')""",
                (
                    cell["id"],
                    result["status"],
                    json.dumps(cell, sort_keys=True),
                    json.dumps(result.get("metrics")),
                    json.dumps(result.get("env")),
                    result.get("error"),
                    result.get("wall_s"),
                    result.get("attempt", 1),
                ),
            )

    def import_cell(self, cell_dir: Path, result: dict | None = None) -> dict:
        """Record a cell directory's outcome and its per-epoch rows in one transaction.

        ``result`` defaults to ``cell_dir/result.json``; the rows come from
        ``cell_dir/metrics.jsonl``. Returns the result recorded.
        """
        cell_dir = Path(cell_dir)
        if result is None:
            result = json.loads((cell_dir / "result.json").read_text())
        self.record(result, read_epoch_rows(cell_dir / "metrics.jsonl"))
        return result

    def epochs(self, cell_id: str) -> list[dict] | None:
        """The per-epoch rows imported with ``cell_id``'s result; None when none were imported
        (a store written before they were, or a cell without rows)."""
        try:
            q = "SELECT row FROM epochs WHERE cell_id = ? ORDER BY seq"
            rows = self.db.execute(q, (cell_id,)).fetchall()
        except sqlite3.OperationalError:  # a store older than the epochs table, opened read-only
            return None
        return [json.loads(r[0]) for r in rows] if rows else None

    def record_grid(self, grid_text: str, cell_ids: list[str]) -> None:
        """Keep the grid last run here and the ids of its cells (what reports show)."""
        with self.transaction() as db:
            for key, value in ((META_GRID, grid_text), (META_CELLS, json.dumps(list(cell_ids)))):
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (key, value),
                )

    def record_teacher(self, spec: dict, metrics: dict, env: dict, wall_s: float) -> None:
        spec = _plain(spec)
        with self.transaction() as db:
            db.execute(
                """INSERT INTO teachers (id, config, metrics, env, wall_s) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET metrics=excluded.metrics, env=excluded.env,
                     wall_s=excluded.wall_s, updated=strftime('%s','now')""",
                (spec["id"], json.dumps(spec, sort_keys=True), json.dumps(metrics), json.dumps(env), wall_s),
            )

    def status(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, status FROM cells"))

    def cells(self, status: str | None = None) -> list[dict]:
        q = "SELECT id, status, config, metrics, env, error, wall_s, attempts FROM cells"
        rows = self.db.execute(q + (" WHERE status = ?" if status else ""), (status,) if status else ())
        out = []
        for r in rows:
            out.append(
                {
                    "id": r[0],
                    "status": r[1],
                    "config": json.loads(r[2]),
                    "metrics": json.loads(r[3]) if r[3] else None,
                    "env": json.loads(r[4]) if r[4] else None,
                    "error": r[5],
                    "wall_s": r[6],
                    "attempts": r[7],
                }
            )
        return out

    # ---- run-level facts
    def get_meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a store older than the meta table, opened read-only
            return None
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    def teachers(self) -> list[dict]:
        rows = self.db.execute("SELECT id, config, metrics, wall_s FROM teachers")
        return [
            {
                "id": r[0],
                "config": json.loads(r[1]),
                "metrics": json.loads(r[2]) if r[2] else None,
                "wall_s": r[3],
            }
            for r in rows
        ]
