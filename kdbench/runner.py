"""The driver of a sweep: resolve the grid, skip what is done, execute the rest, import results.

Workers (in-process, or local processes) only run cells and write ``result.json``; this
driver is the only writer of ``results.sqlite``, and holds the run directory's lock while it
runs (a second driver on the same directory refuses at once). Before executing anything it imports every
result file already on disk, so a driver killed after a cell finished loses nothing, and a
cell killed mid-training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import platform
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdbench import registry
from kdbench.artifacts import disk_error
from kdbench.cells import Cell, TeacherSpec, changed_entries
from kdbench.config import Grid, PluginRef, Problems, executor_ref, load_yaml
from kdbench.errors import KdbenchError
from kdbench.grid import expand
from kdbench.pool import cpu_budget, retry_if_allowed, run_pool
from kdbench.preflight import method_fit, teacher_datasets
from kdbench.store import Store


@dataclass
class Plan:
    """A resolved sweep: its cells and where they go."""

    grid: Grid
    run_dir: Path
    cells: list[Cell]
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    #: the executor plugin and its parameters (the grid's, or ``--executor``'s kind)
    executor: PluginRef | None = None
    #: cell id -> why it cannot run ("grid.yaml:9: methods[3]: fsp does not fit ..."): failed at
    #: once by ``execute`` (no teacher trained for it), listed by ``--dry-run``
    incompatible: dict[str, str] = field(default_factory=dict)


def plan(grid: Grid, out: Path | None = None, executor: str | None = None) -> Plan:
    """Instantiate datasets and teacher sources (checks roots and files) and expand the cells.

    Raises ConfigError listing every problem; writes nothing.
    """
    from kdbench.engine.cell import load_dataset

    _, root = load_yaml(Path(grid.file))
    problems = Problems(grid.file, root)
    ds_fp: list[dict] = []
    instances: list[Any] = []
    for i, ref in enumerate(grid.datasets):
        try:
            # the engine's per-process cache: an inline sweep loads each dataset once
            instances.append(load_dataset({"name": ref.name, "params": ref.params}))
            ds_fp.append(instances[-1].fingerprint())
        except KdbenchError as e:
            problems.add(("datasets", i), str(e))
    src_fp: list[dict] = []
    for i, (_, _, src) in enumerate(grid.pairs):
        try:
            src_fp.append(registry.load("teachers", src.name)(**src.params).fingerprint())
        except KdbenchError as e:
            problems.add(("pairs", i, "source"), str(e))
    problems.raise_if_any()
    # every method built once per (dataset, pair) from untrained models: FSP's channel
    # mismatch and the like are config problems here, not failures after the teacher trained
    tds_fp, tds_problems = teacher_datasets(grid, instances)
    pair_problems, misfits = method_fit(grid, instances)
    for where, msg in tds_problems + pair_problems:
        problems.add(where, msg)
    problems.raise_if_any()
    cells = expand(grid, ds_fp, src_fp, tds_fp)
    run_dir = Path(out) if out is not None else grid.run_dir
    teachers = {c.teacher.id: c.teacher for c in cells if c.uses_teacher}
    ex = grid.executor if executor is None and grid.executor is not None else None
    if ex is None:
        ex = executor_ref(grid.config.executor, kind=executor)
    return Plan(grid, run_dir, cells, teachers, ex, _incompatible(grid, cells, misfits, root))


def _incompatible(grid: Grid, cells: list[Cell], misfits: dict, root: Any) -> dict[str, str]:
    """Cell id -> located message for the cells of (dataset, pair, method) misfits."""
    if not misfits:
        return {}
    coords = itertools.product(
        range(len(grid.datasets)), range(len(grid.pairs)), range(len(grid.methods)), grid.config.seeds
    )
    out = {}
    for (d_i, p_i, m_i, _), c in zip(coords, cells, strict=True):
        if (d_i, p_i, m_i) in misfits:
            where, msg = misfits[d_i, p_i, m_i]
            located = Problems(grid.file, root)
            located.add(where, msg)
            out[c.id] = located.items[0]
    return out


def _warn_changed(p: Plan, done_configs: list[dict], console: Console) -> None:
    """Say why finished cells of this run directory run again: same grid entries, new ids."""
    for what, old in changed_entries(p.cells, done_configs).items():
        console.print(
            f"[yellow]{len(old)} finished cell(s) of this run directory run again under new ids: "
            f"their {escape(what)} changed[/yellow] (the old results stay in the store; "
            "`kdbench report RUN --all` shows them)"
        )


def _fail_incompatible(
    p: Plan, store: Store, todo: list[Cell], attempts: dict, counts: dict, console: Console
) -> list[Cell]:
    """Record the plan's incompatible cells as failed at once; the rest of ``todo`` runs."""
    for c in todo:
        if c.id in p.incompatible:
            error = f"ConfigError: {p.incompatible[c.id]}"
            result = {"cell": c, "status": "failed", "error": error, "attempt": attempts[c.id], "wall_s": 0.0}
            store.record(result)
            counts["failed"] += 1
            console.print(f"[red]failed[/red] {escape(c.describe)}: {escape(error)}")
    return [c for c in todo if c.id not in p.incompatible]


def import_results(store: Store, run_dir: Path, cells: list[Cell]) -> None:
    """Record every result file on disk that the store does not yet hold as done (and that is
    not older than the attempt the store holds: a killed worker leaves no file of its own)."""
    status = store.status()
    tries = {r["id"]: r["attempts"] for r in store.cells()} if status else {}
    for c in cells:
        f = run_dir / "cells" / c.id / "result.json"
        if f.exists() and status.get(c.id) != "done":
            try:
                result = json.loads(f.read_text())
                if result.get("status") == "done" or int(result.get("attempt", 1)) >= tries.get(c.id, 0):
                    store.record(result)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass  # never half-written, but a foreign file must not stop the sweep
    for f in (run_dir / "teachers").glob("*/result.json"):
        try:
            r = json.loads(f.read_text())
            store.record_teacher(r["teacher"], r["metrics"], r.get("env", {}), r.get("wall_s", 0.0))
        except (json.JSONDecodeError, KeyError):
            pass


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
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
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


def _check_writable(run_dir: Path) -> None:
    """Fail (exit 2) before anything is written when ``run_dir`` cannot take new files.

    ``O_TMPFILE`` makes a nameless file, so the probe leaves nothing behind even when it works;
    it also catches read-only mounts, which root's permission bypass does not.
    """
    flag = getattr(os, "O_TMPFILE", 0)
    try:
        if flag:
            os.close(os.open(run_dir, flag | os.O_WRONLY, 0o600))
        elif not os.access(run_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise not_writable(run_dir, e) from None
        # EOPNOTSUPP/EISDIR/EINVAL: the filesystem has no O_TMPFILE; later writes will tell


def _done_in_store(run_dir: Path) -> set[str]:
    """Ids of cells the store already records as done (read without writing)."""
    db = run_dir / "results.sqlite"
    if not db.exists():
        return set()
    store = Store.read_only(db)
    try:
        return {i for i, s in store.status().items() if s == "done"}
    finally:
        store.close()


def _done_on_disk(run_dir: Path, cells: list[Cell]) -> set[str]:
    """Ids of cells already done, read from the store and result files without writing."""
    done = _done_in_store(run_dir)
    for c in cells:
        f = run_dir / "cells" / c.id / "result.json"
        if c.id not in done and f.exists():
            try:
                if json.loads(f.read_text()).get("status") == "done":
                    done.add(c.id)
            except (OSError, ValueError, AttributeError):
                pass
    return done


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``path`` atomically unless it already holds ``data`` (a finished rerun writes nothing)."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, e) from None


def resolve_threads(p: Plan, workers: int | None, console: Console) -> tuple[int, int]:
    """(workers, intra-op threads per cell) that fit the CPUs this process may use.

    The thread count is the grid's ``executor.threads`` whatever the schedule (inline or N
    workers), so a cell's numbers do not depend on it. Workers are reduced when
    ``workers x threads`` would oversubscribe the CPUs (oversubscribed OpenMP is ~25x slower).
    """
    budget = cpu_budget()
    threads = p.grid.config.executor.threads
    local = p.executor is None or p.executor.name == "local"
    n_workers = max(1, workers or (p.executor.params.get("workers", 1) if p.executor else 1)) if local else 1
    if threads > budget:
        console.print(
            f"[yellow]warning:[/yellow] executor.threads is {threads} but this process may use "
            f"{budget} CPU(s); using {budget} (numbers may differ in the last bits from a run "
            f"with {threads})"
        )
        threads = budget
    if n_workers * threads > budget:
        fit = max(1, budget // threads)
        console.print(
            f"[yellow]warning:[/yellow] {n_workers} workers x {threads} thread(s) would oversubscribe "
            f"the {budget} CPU(s) this process may use; running {fit} worker(s)"
        )
        n_workers = fit
    return n_workers, threads


def _warn_thread_change(store: Store, threads: int, cells: list[Cell], console: Console) -> None:
    """Say so when this run computes with another thread count than the cells before it."""
    ids = {c.id for c in cells}
    before = {
        (r["env"] or {}).get("threads")
        for r in store.cells("done")
        if r["id"] in ids and (r["env"] or {}).get("threads") is not None
    }
    last = store.get_meta("threads")
    if last is not None:
        before.add(int(last))
    other = sorted(t for t in before if t != threads)
    if other:
        console.print(
            f"[yellow]warning:[/yellow] this run uses {threads} thread(s) per cell, earlier cells or "
            f"partial cells of this run directory used {', '.join(map(str, other))}: their numbers can "
            f"differ in the last bits; set executor.threads: {other[0]} to continue with the same arithmetic"
        )
    store.set_meta("threads", str(threads))


def execute(
    p: Plan, workers: int | None = None, console: Console | None = None, detach: bool = False
) -> dict[str, Any]:
    """Run every cell not yet done. Returns counts {total, skipped, done, failed}.

    A finished run writes nothing (it may live in a read-only archive). Otherwise the run
    directory is locked for this driver (a second driver stops at once) and checked writable.
    """
    console = console or Console(stderr=True)
    grid_text = Path(p.grid.file).read_bytes()
    ids_text = (json.dumps([c.id for c in p.cells], indent=2) + "\n").encode()
    done = _done_on_disk(p.run_dir, p.cells) if p.run_dir.exists() else set()
    n = len(p.cells)
    # all done and all in the store: nothing to write (results finished by detached jobs are
    # on disk only, and the locked path below imports them)
    if (
        n
        and len(done & {c.id for c in p.cells}) == n
        and {c.id for c in p.cells} <= _done_in_store(p.run_dir)
    ):
        console.print(f"[dim]{n} of {n} cells already done; nothing to run[/dim]")
        try:  # keep "the grid last run here" right when another grid reached the same cells
            _write_if_changed(p.run_dir / "grid.yaml", grid_text)
            _write_if_changed(p.run_dir / "cells.json", ids_text)
        except KdbenchError:
            pass  # a read-only archive: nothing to write is not an error
        return {"total": n, "skipped": n, "done": 0, "failed": 0}
    n_workers, threads = resolve_threads(p, workers, console)
    with RunLock(p.run_dir):
        _check_writable(p.run_dir)
        # the grid last run here, next to the ids of its cells (what `kdbench report` shows)
        _write_if_changed(p.run_dir / "grid.yaml", grid_text)
        _write_if_changed(p.run_dir / "cells.json", ids_text)
        store = _open_store(p.run_dir)
        try:
            return _execute_locked(p, store, n_workers, threads, console, detach)
        finally:
            store.close()


def _open_store(run_dir: Path) -> Store:
    try:
        return Store(run_dir / "results.sqlite")
    except sqlite3.OperationalError as e:
        raise KdbenchError(f"cannot open {run_dir / 'results.sqlite'}: {e}") from None


def _execute_locked(
    p: Plan, store: Store, n_workers: int, threads: int, console: Console, detach: bool = False
) -> dict[str, Any]:
    store.add_pending(p.cells)
    import_results(store, p.run_dir, p.cells)
    _warn_thread_change(store, threads, p.cells, console)
    before = {c["id"]: c for c in store.cells()}
    _warn_changed(p, [r["config"] for r in before.values() if r["status"] == "done"], console)
    todo = [c for c in p.cells if before[c.id]["status"] != "done"]
    counts = {"total": len(p.cells), "skipped": len(p.cells) - len(todo), "done": 0, "failed": 0}
    if counts["skipped"]:
        console.print(f"[dim]{counts['skipped']} of {len(p.cells)} cells already done; skipping them[/dim]")
    attempts = {c.id: before[c.id]["attempts"] + 1 for c in todo}
    todo = _fail_incompatible(p, store, todo, attempts, counts, console)
    if p.executor is not None and (p.executor.name != "local" or detach):
        from kdbench.executors.driver import run_external

        run_external(p, store, todo, attempts, threads, counts, console, detach)
        import_results(store, p.run_dir, p.cells)
        return counts
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        overall = bar.add_task("cells", total=len(todo))
        faults = _Faults(p, attempts)
        share = p.grid.config.executor.share_teacher  # lockstep groups (kdbench/engine/lockstep.py)
        if n_workers == 1 or len(todo) <= 1:
            torch.set_num_threads(threads)
            if share:
                _run_groups(todo, p.run_dir, store, bar, overall, faults, counts)
            else:
                _run_inline(todo, p.run_dir, store, bar, overall, faults, counts)
        else:  # with share_teacher, a group is one job of one worker
            jobs: list[Any] = list(todo)
            if share:
                from kdbench.engine.lockstep import plan_groups

                jobs = [g if len(g) > 1 else g[0] for g in plan_groups(todo)]
            gpus = p.executor.params.get("gpus") if p.executor is not None else None
            _run_pool(jobs, p.run_dir, store, bar, overall, faults, counts, n_workers, threads, gpus)
    import_results(store, p.run_dir, p.cells)
    return counts


def _describe(cell: Cell | dict) -> str:
    if isinstance(cell, Cell):
        return cell.describe
    return (
        f"{cell['method']['label']} {cell['teacher']['label']}→{cell['student']['label']} "
        f"{cell['dataset']['name']} seed {cell['seed']}"
    )


class _Faults:
    """The local executor's fault policy: ``executor.time_limit`` per attempt and ``retries``
    (the ``local`` plugin's parameter) for cells whose worker died or that hit the limit."""

    def __init__(self, p: Plan, attempts: dict[str, int]):
        self.attempts = attempts
        self.first = dict(attempts)
        self.time_limit = p.grid.config.executor.time_limit
        self.retries = int(p.executor.params.get("retries", 0)) if p.executor is not None else 0

    def retry(self, result: dict) -> bool:
        """True (and the next attempt counted) when ``result``'s cell should run again."""
        return retry_if_allowed(result, self.attempts, self.first, self.retries)


def _tally(result: dict, store: Store, counts: dict, console: Console) -> None:
    store.record(result)
    if result.get("retry_attempt"):  # a failed attempt the executor runs again
        console.print(
            f"[yellow]attempt {result['attempt']} failed[/yellow] {escape(_describe(result['cell']))}: "
            f"{escape(str(result.get('error')))}; retrying (attempt {result['retry_attempt']})"
        )
        return
    counts[result["status"]] += 1
    if result["status"] == "failed":
        console.print(
            f"[red]failed[/red] {escape(_describe(result['cell']))}: {escape(str(result.get('error')))}"
        )
    else:
        m = result["metrics"]
        console.print(
            f"[green]done[/green] {escape(_describe(result['cell']))}: top-1 {m['top1']:.2f}"
            f" ({result['wall_s']:.1f} s)"
        )


def _run_inline(todo, run_dir, store, bar, overall, faults: _Faults, counts) -> None:
    from kdbench.engine.cell import run_cell

    queue = deque(todo)
    while queue:
        c = queue.popleft()
        desc = _describe(c)
        bar.update(overall, description=desc)

        def on_epoch(row: dict, desc: str = desc) -> None:
            _epoch_line(bar, overall, desc, row)

        result = run_cell(c, run_dir, on_epoch, faults.attempts[c.id], faults.time_limit)
        if faults.retry(result):
            queue.append(c)
        _tally(result, store, counts, bar.console)
        if not result.get("retry_attempt"):
            bar.advance(overall)


def _run_groups(todo, run_dir, store, bar, overall, faults: _Faults, counts) -> None:
    """Cells that share a teacher's inputs run side by side, the teacher's forward computed once.
    The time limit applies to the group's wall time; cells to retry run again as a group."""
    from kdbench.engine.lockstep import plan_groups, run_group
    from kdbench.engine.train import time_limit

    def progress(c: Cell):
        return lambda row, desc=_describe(c): _epoch_line(bar, overall, desc, row)

    queue = deque(plan_groups(todo))
    while queue:
        group = queue.popleft()
        again: list[Cell] = []

        def on_result(result: dict, group: list[Cell] = group, again: list[Cell] = again) -> None:
            if faults.retry(result):
                again.extend(c for c in group if c.id == result["cell"]["id"])
            _tally(result, store, counts, bar.console)
            if not result.get("retry_attempt"):
                bar.advance(overall)

        bar.update(overall, description=f"{len(group)} cells sharing a teacher: {_describe(group[0])}")
        with time_limit(faults.time_limit):
            run_group(group, run_dir, progress, faults.attempts, on_result)
        if again:
            queue.append(again)


def _epoch_line(bar: Progress, overall: Any, desc: str, row: dict) -> None:
    acc = row.get("test_top1", row.get("test/top1"))
    extra = f" acc {acc:.2f}" if acc is not None else ""
    line = f"{desc} [{row['stage']} {row['epoch']}/{row['epochs']}{extra}]"
    if bar.disable:  # not a terminal (CI logs, pipes): one line per epoch
        bar.console.print(f"  {escape(line)}", highlight=False)
    bar.update(overall, description=line)


def _run_pool(todo, run_dir, store, bar, overall, faults, counts, n_workers, threads, gpus=None) -> None:
    def on_result(result: dict) -> None:
        _tally(result, store, counts, bar.console)
        if not result.get("retry_attempt"):
            bar.advance(overall)

    def on_progress(cell: Cell, row: dict) -> None:
        _epoch_line(bar, overall, _describe(cell), row)

    run_pool(
        todo,
        run_dir,
        n_workers,
        threads,
        faults.attempts,
        on_result,
        on_progress,
        gpus,
        faults.time_limit,
        faults.retries,
    )
