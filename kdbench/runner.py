"""The driver of a sweep: resolve the grid, skip what is done, execute the rest, import results.

Workers (in-process, or local processes) only run cells and write ``result.json``; this
driver is the only writer of ``results.sqlite``. Before executing anything it imports every
result file already on disk, so a driver killed after a cell finished loses nothing, and a
cell killed mid-training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdbench import registry
from kdbench.config import Grid, Problems, load_yaml
from kdbench.errors import KdbenchError
from kdbench.grid import expand
from kdbench.store import Store, write_json_atomic


@dataclass
class Plan:
    """A resolved sweep: its cells and where they go."""

    grid: Grid
    run_dir: Path
    cells: list[dict]
    teachers: dict[str, dict] = field(default_factory=dict)


def plan(grid: Grid, out: Path | None = None) -> Plan:
    """Instantiate datasets and teacher sources (checks roots and files) and expand the cells.

    Raises ConfigError listing every problem; writes nothing.
    """
    _, root = load_yaml(Path(grid.file))
    problems = Problems(grid.file, root)
    ds_fp: list[dict] = []
    for i, ref in enumerate(grid.datasets):
        try:
            ds_fp.append(registry.load("datasets", ref.name)(**ref.params).fingerprint())
        except KdbenchError as e:
            problems.add(("datasets", i), str(e))
    src_fp: list[dict] = []
    for i, (_, _, src) in enumerate(grid.pairs):
        try:
            src_fp.append(registry.load("teachers", src.name)(**src.params).fingerprint())
        except KdbenchError as e:
            problems.add(("pairs", i, "source"), str(e))
    problems.raise_if_any()
    cells = expand(grid, ds_fp, src_fp)
    run_dir = Path(out) if out is not None else grid.run_dir
    teachers = {c["teacher"]["id"]: c["teacher"] for c in cells if c["uses_teacher"]}
    return Plan(grid, run_dir, cells, teachers)


def import_results(store: Store, run_dir: Path, cells: list[dict]) -> None:
    """Record every result file on disk that the store does not yet hold as done."""
    status = store.status()
    for c in cells:
        f = run_dir / "cells" / c["id"] / "result.json"
        if f.exists() and status.get(c["id"]) != "done":
            try:
                store.record(json.loads(f.read_text()))
            except (json.JSONDecodeError, KeyError):
                pass  # never half-written, but a foreign file must not stop the sweep
    for f in (run_dir / "teachers").glob("*/result.json"):
        try:
            r = json.loads(f.read_text())
            store.record_teacher(r["teacher"], r["metrics"], r.get("env", {}), r.get("wall_s", 0.0))
        except (json.JSONDecodeError, KeyError):
            pass


def _worker(cell: dict, run_dir: str, attempt: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from kdbench.engine.cell import run_cell

    return run_cell(cell, Path(run_dir), None, attempt)


def execute(p: Plan, workers: int | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run every cell not yet done. Returns counts {total, skipped, done, failed}."""
    console = console or Console(stderr=True)
    p.run_dir.mkdir(parents=True, exist_ok=True)
    # the grid last run here, next to the ids of its cells (what `kdbench report` shows)
    tmp = p.run_dir / ".grid.yaml.tmp"
    shutil.copyfile(p.grid.file, tmp)
    os.replace(tmp, p.run_dir / "grid.yaml")
    write_json_atomic(p.run_dir / "cells.json", [c["id"] for c in p.cells])
    store = Store(p.run_dir / "results.sqlite")
    try:
        store.add_pending(p.cells)
        import_results(store, p.run_dir, p.cells)
        before = {c["id"]: c for c in store.cells()}
        todo = [c for c in p.cells if before[c["id"]]["status"] != "done"]
        counts = {"total": len(p.cells), "skipped": len(p.cells) - len(todo), "done": 0, "failed": 0}
        if counts["skipped"]:
            console.print(
                f"[dim]{counts['skipped']} of {len(p.cells)} cells already done; skipping them[/dim]"
            )
        n_workers = max(1, workers or p.grid.config.executor.workers)
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
            attempts = {c["id"]: before[c["id"]]["attempts"] + 1 for c in todo}
            if n_workers == 1 or len(todo) <= 1:
                _run_inline(todo, p.run_dir, store, bar, overall, attempts, counts)
            else:
                _run_pool(todo, p.run_dir, store, bar, overall, attempts, counts, n_workers)
        import_results(store, p.run_dir, p.cells)
        return counts
    finally:
        store.close()


def _describe(cell: dict) -> str:
    return (
        f"{cell['method']['label']} {cell['teacher']['label']}→{cell['student']['label']} "
        f"{cell['dataset']['name']} seed {cell['seed']}"
    )


def _tally(result: dict, store: Store, counts: dict, console: Console) -> None:
    store.record(result)
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


def _run_inline(todo, run_dir, store, bar, overall, attempts, counts) -> None:
    from kdbench.engine.cell import run_cell

    for c in todo:
        desc = _describe(c)
        bar.update(overall, description=desc)

        def on_epoch(row: dict, desc: str = desc) -> None:
            acc = row.get("test_top1")
            extra = f" acc {acc:.2f}" if acc is not None else ""
            line = f"{desc} [{row['stage']} {row['epoch']}/{row['epochs']}{extra}]"
            if bar.disable:  # not a terminal (CI logs, pipes): one line per epoch
                bar.console.print(f"  {escape(line)}", highlight=False)
            bar.update(overall, description=line)

        result = run_cell(c, run_dir, on_epoch, attempts[c["id"]])
        _tally(result, store, counts, bar.console)
        bar.advance(overall)


def _run_pool(todo, run_dir, store, bar, overall, attempts, counts, n_workers) -> None:
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    ctx = mp.get_context("spawn")  # fork after torch initialised its thread pools is unsafe
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        futures = {pool.submit(_worker, c, str(run_dir), attempts[c["id"]], threads): c for c in todo}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    try:
                        result = f.result()
                    except Exception as e:  # a worker died (OOM, segfault): record, keep going
                        cell = futures[f]
                        result = {
                            "cell": cell,
                            "status": "failed",
                            "error": f"worker died: {e}",
                            "attempt": attempts[cell["id"]],
                        }
                    _tally(result, store, counts, bar.console)
                    bar.advance(overall)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
