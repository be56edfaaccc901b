"""The driver of a sweep: resolve the grid, skip what is done, execute the rest, import results.

Workers (in-process, or local processes) only run cells and write ``result.json``; this
driver is the only writer of ``results.sqlite``, and holds the run directory's lock while it
runs (a second driver on the same directory refuses at once). Before executing anything it imports every
result file already on disk, so a driver killed after a cell finished loses nothing, and a
cell killed mid-training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import datetime
import inspect
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdbench import registry
from kdbench.cells import Cell, CellResult, Job, PluginKey, TeacherSpec, changed_entries
from kdbench.config import Grid, PluginRef, executor_ref, load_yaml
from kdbench.errors import ConfigError, KdbenchError
from kdbench.executors.base import Events, Executor, RetryPolicy
from kdbench.grid import expand
from kdbench.preflight import method_fit, teacher_datasets
from kdbench.procs import cpu_budget
from kdbench.rundir import RunDir
from kdbench.store import META_LAST_RUN, Store


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
    #: cell id -> what its method built for the cell's pair (``Distiller.describe``; OFA's
    #: projectors), where a method says; shown by ``--dry-run``
    built: dict[str, str] = field(default_factory=dict)


def plan(grid: Grid, out: Path | None = None, executor: str | None = None) -> Plan:
    """Instantiate datasets and teacher sources (checks roots and files) and expand the cells.

    Raises ConfigError listing every problem; writes nothing.
    """
    from kdbench.engine.cell import load_dataset

    _, root = load_yaml(Path(grid.file))
    problems = grid.problems(root)
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
    descriptions: dict[tuple[int, int, int], str] = {}
    pair_problems, misfits = method_fit(grid, instances, descriptions)
    from kdbench.engine.softlabels import replay_problems  # methods that cannot replay soft labels

    for where, msg in tds_problems + pair_problems + replay_problems(grid):
        problems.add(where, msg)
    problems.raise_if_any()
    cells = expand(grid, ds_fp, src_fp, tds_fp)
    run_dir = Path(out) if out is not None else grid.run_dir
    teachers = {c.teacher.id: c.teacher for c in cells if c.uses_teacher}
    ex = grid.executor if executor is None and grid.executor is not None else None
    if ex is None:
        ex = executor_ref(grid.config.executor, kind=executor)
    incompatible = _incompatible(grid, cells, misfits, root)
    return Plan(grid, run_dir, cells, teachers, ex, incompatible, _by_cell(grid, cells, descriptions))


def _by_cell(grid: Grid, cells: list[Cell], per_entry: dict[tuple[int, int, int], str]) -> dict[str, str]:
    """Cell id -> the value of its (dataset, pair, method) entry, for the entries that have one."""
    if not per_entry:
        return {}
    coords = itertools.product(
        range(len(grid.datasets)), range(len(grid.pairs)), range(len(grid.methods)), grid.config.seeds
    )
    return {
        c.id: per_entry[d_i, p_i, m_i]
        for (d_i, p_i, m_i, _), c in zip(coords, cells, strict=True)
        if (d_i, p_i, m_i) in per_entry
    }


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
            located = grid.problems(root)
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
    p: Plan, rd: RunDir, store: Store, todo: list[Cell], attempts: dict, tally: Any
) -> list[Cell]:
    """Record the plan's incompatible cells as failed at once; the rest of ``todo`` runs."""
    for c in todo:
        if c.id in p.incompatible:
            tally(CellResult.failed(c, attempts[c.id], f"ConfigError: {p.incompatible[c.id]}"))
    return [c for c in todo if c.id not in p.incompatible]


def build_executor(ref: PluginRef, workers: int | None, console: Console) -> Executor:
    """The plan's executor plugin; ``--workers`` overrides its ``workers`` where it has one."""
    cls = registry.load("executors", ref.name)
    params = dict(ref.params)
    if workers is not None:
        if "workers" in inspect.signature(cls).parameters:
            params["workers"] = workers
        else:
            console.print(
                f"[yellow]warning:[/yellow] executor {ref.name!r} has no workers; --workers ignored"
            )
    return cls(**params)


def fit_threads(p: Plan, ex: Executor, console: Console) -> int:
    """Intra-op threads per cell (the grid's ``executor.threads``, whatever the schedule, so a
    cell's numbers do not depend on it), and the executor's parallelism fitted to the CPUs this
    process may use (oversubscribed OpenMP is ~25x slower)."""
    budget = cpu_budget()
    threads = p.grid.config.executor.threads
    if threads > budget:
        console.print(
            f"[yellow]warning:[/yellow] executor.threads is {threads} but this process may use "
            f"{budget} CPU(s); using {budget} (numbers may differ in the last bits from a run "
            f"with {threads})"
        )
        threads = budget
    said = ex.fit(budget, threads)
    if said:
        console.print(f"[yellow]warning:[/yellow] {escape(said)}")
    if ex.chose():
        console.print(f"[dim]{escape(ex.chose())}[/dim]")
    return threads


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


def build_softlabels(p: Plan) -> list[Path]:
    """Train the teachers and build the soft-label banks of every cell of ``p`` that replays them
    (``teacher_outputs: replay``), in this process, ahead of ``kdbench run``; the banks' directories.
    Cells sharing a bank (same teacher, data, seed, crop recipe, epochs) build it once."""
    from kdbench.engine.cell import prepare_softlabels

    banks = {prepare_softlabels(c, p.run_dir) for c in p.cells}
    return sorted(b for b in banks if b is not None)


def make_jobs(p: Plan, todo: list[Cell], attempts: dict[str, int], threads: int, slots: int = 1) -> list[Job]:
    """One job per cell, or with ``executor.share_teacher`` one per lockstep group, groups cut
    where ``slots`` workers would otherwise wait on one big group."""
    ex = p.grid.config.executor
    if ex.share_teacher:
        from kdbench.engine.lockstep import balance_groups, plan_groups
        from kdbench.engine.softlabels import is_replay

        # a cell replaying soft labels runs no teacher forward to share: it runs alone
        alone = [[c] for c in todo if is_replay(c.train.teacher_outputs)]
        groups = balance_groups(plan_groups(c for c in todo if not is_replay(c.train.teacher_outputs)), slots)
        groups += alone
    else:
        groups = [[c] for c in todo]
    loggers = p.grid.loggers  # presentation: handed to the engine with the job, not in the cells
    keys = None if loggers is None else tuple(PluginKey(name=r.name, params=r.params) for r in loggers)
    return [
        Job(tuple(g), tuple(attempts[c.id] for c in g), str(p.run_dir), threads, ex.time_limit, keys)
        for g in groups
    ]


def execute(
    p: Plan, workers: int | None = None, console: Console | None = None, detach: bool = False
) -> dict[str, Any]:
    """Run every cell not yet done. Returns counts {total, skipped, done, failed}.

    A finished run writes nothing (it may live in a read-only archive). Otherwise the run
    directory is locked for this driver (a second driver stops at once) and checked writable.
    """
    console = console or Console(stderr=True)
    rd = RunDir(p.run_dir)
    grid_text = p.grid.text.encode() if p.grid.text else Path(p.grid.file).read_bytes()
    ids_text = (json.dumps([c.id for c in p.cells], indent=2) + "\n").encode()
    n, ids = len(p.cells), {c.id for c in p.cells}
    # all done and all in the store: nothing to write (results finished by detached jobs are
    # on disk only, and the locked path below imports them)
    if n and p.run_dir.exists() and ids <= rd.done_on_disk(p.cells) and ids <= rd.done_in_store():
        console.print(f"[dim]{n} of {n} cells already done; nothing to run[/dim]")
        try:  # keep "the grid last run here" right when another grid reached the same cells
            rd.write_if_changed("grid.yaml", grid_text)
            rd.write_if_changed("cells.json", ids_text)
        except KdbenchError:
            pass  # a read-only archive: nothing to write is not an error
        return {"total": n, "skipped": n, "done": 0, "failed": 0}
    ex = build_executor(p.executor, workers, console)
    if detach and not ex.detachable:
        raise ConfigError(
            f"executor {p.executor.name!r} cannot detach; "
            "use `executor: {kind: submitit}` or run without --detach"
        )
    threads = fit_threads(p, ex, console)
    with rd.lock():
        rd.check_writable()
        # the grid last run here, next to the ids of its cells (what `kdbench report` shows)
        rd.write_if_changed("grid.yaml", grid_text)
        rd.write_if_changed("cells.json", ids_text)
        store = rd.open_store()
        try:
            store.record_grid(grid_text.decode(errors="replace"), [c.id for c in p.cells])
            t0 = time.perf_counter()
            counts = _Sweep(p, rd, store, ex, console).run(threads, detach)
            if not detach and counts["done"] + counts["failed"]:  # what the report's page shows
                record = {
                    "wall_s": round(time.perf_counter() - t0, 3),
                    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    **{k: counts[k] for k in ("done", "failed", "skipped")},
                }
                store.set_meta(META_LAST_RUN, json.dumps(record))
            return counts
        finally:
            store.close()


class _Sweep:
    """One locked pass of the driver over a plan: import, skip, plan jobs, execute, import."""

    def __init__(self, p: Plan, rd: RunDir, store: Store, ex: Executor, console: Console):
        self.p, self.rd, self.store, self.ex, self.console = p, rd, store, ex, console
        self.counts: dict[str, int] = {"total": len(p.cells), "skipped": 0, "done": 0, "failed": 0}
        self.warned: set[str] = set()  # logger problems already printed (each once per sweep)

    def run(self, threads: int, detach: bool) -> dict[str, Any]:
        p, store = self.p, self.store
        store.add_pending(p.cells)
        self.rd.import_results(store, p.cells)
        _warn_thread_change(store, threads, p.cells, self.console)
        before = {c["id"]: c for c in store.cells()}
        _warn_changed(p, [r["config"] for r in before.values() if r["status"] == "done"], self.console)
        todo = [c for c in p.cells if before[c.id]["status"] != "done"]
        self.counts["skipped"] = len(p.cells) - len(todo)
        if self.counts["skipped"]:
            self.console.print(
                f"[dim]{self.counts['skipped']} of {len(p.cells)} cells already done; skipping them[/dim]"
            )
        attempts = {c.id: before[c.id]["attempts"] + 1 for c in todo}
        todo = self._not_running(_fail_incompatible(p, self.rd, store, todo, attempts, self.tally))
        jobs = make_jobs(p, todo, attempts, threads, self.ex.slots())
        if detach:
            self._submit(jobs, attempts)
        elif jobs:
            self._execute(jobs)
        self.rd.import_results(store, p.cells)
        return self.counts

    def _not_running(self, todo: list[Cell]) -> list[Cell]:
        """``todo`` less the cells submitted earlier (``--detach``) that are still queued or running."""
        submitted = self.rd.read_jobs()
        mine = {
            c.id: submitted[c.id]["job"]
            for c in todo
            if submitted.get(c.id, {}).get("executor") == self.p.executor.name
        }
        running = {cid for cid, up in self.ex.alive(mine).items() if up} if mine else set()
        if running:
            self.console.print(
                f"[dim]{len(running)} cell(s) still queued or running under {self.p.executor.name}; "
                "not resubmitted[/dim]"
            )
            self.counts["running"] = len(running)
        return [c for c in todo if c.id not in running]

    def _submit(self, jobs: list[Job], attempts: dict[str, int]) -> None:
        ids = self.ex.submit(jobs) if jobs else {}
        self.rd.record_submitted(self.p.executor.name, ids, attempts)
        self.counts["submitted"] = sum(len(j.cells) for j in jobs)
        self.console.print(
            f"submitted {self.counts['submitted']} cell(s) to {self.p.executor.name}; "
            f"`kdbench status {self.p.run_dir}` shows them and `kdbench run` again collects the results"
        )

    def _execute(self, jobs: list[Job]) -> None:
        n = sum(len(j.cells) for j in jobs)
        if n > len(jobs):
            self.console.print(f"[dim]running {n} cell(s) as {len(jobs)} job(s) sharing teachers[/dim]")
        policy = RetryPolicy(self.ex.retries, self.p.grid.config.executor.time_limit)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=False, disable=not self.console.is_terminal,
        ) as bar:  # fmt: skip
            self.bar, self.overall = bar, bar.add_task("cells", total=n)
            self.ex.run(jobs, Events(self.tally, self._epoch_line), policy)
            self.bar = None

    def tally(self, result: CellResult) -> None:
        """Record ``result`` and say what happened to its cell."""
        self.rd.record(self.store, result)
        desc, err = escape(result.cell.describe), escape(str(result.error))
        bar = getattr(self, "bar", None)
        console = bar.console if bar is not None else self.console
        if result.retry_attempt:  # a failed attempt the executor runs again
            console.print(
                f"[yellow]attempt {result.attempt} failed[/yellow] {desc}: {err}; "
                f"retrying (attempt {result.retry_attempt})"
            )
            return
        self.counts[result.status] += 1
        shared = result.env.get("teacher_forwards") or {}
        for k in ("computed", "reused"):
            self.counts[f"teacher_forwards_{k}"] = self.counts.get(f"teacher_forwards_{k}", 0) + shared.get(
                k, 0
            )
        if bar is not None:
            bar.advance(self.overall)
        for problem in result.env.get("logger_problems", ()):
            if problem not in self.warned:
                self.warned.add(problem)
                where = self.p.run_dir / "cells" / result.id / "log.txt"
                console.print(f"[yellow]warning:[/yellow] {escape(problem)} (first in {where})")
        if result.status == "failed":
            console.print(f"[red]failed[/red] {desc}: {err}")
        else:
            console.print(
                f"[green]done[/green] {desc}: top-1 {result.metrics['top1']:.2f} ({result.wall_s:.1f} s)"
            )

    def _epoch_line(self, cell: Cell, row: dict) -> None:
        acc = row.get("test_top1", row.get("test/top1"))
        extra = f" acc {acc:.2f}" if acc is not None else ""
        line = f"{cell.describe} [{row['stage']} {row['epoch']}/{row['epochs']}{extra}]"
        if self.bar.disable:  # not a terminal (CI logs, pipes): one line per epoch
            self.bar.console.print(f"  {escape(line)}", highlight=False)
        self.bar.update(self.overall, description=line)
