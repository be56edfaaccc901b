"""The driver's side of a non-local executor: submit, wait or detach, and ``kdbench status``.

The driver holds the run directory's lock while it submits and (unless ``--detach``) while it
waits; every result comes back through ``cells/<id>/result.json``, which only the driver
imports into ``results.sqlite``. ``jobs.json`` remembers what was submitted where, so a later
``kdbench run`` collects finished cells and resubmits only what is neither done nor still
queued or running (a running cell is never duplicated).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from kdbench import registry
from kdbench.errors import ConfigError
from kdbench.executors.base import CellJob, Executor
from kdbench.store import Store, write_json_atomic

JOBS_FILE = "jobs.json"


def read_jobs(run_dir: Path) -> dict[str, dict[str, Any]]:
    f = Path(run_dir) / JOBS_FILE
    if not f.exists():
        return {}
    try:
        data = json.loads(f.read_text())
    except ValueError:
        return {}  # never half-written (atomic); a foreign file must not stop the sweep
    return data if isinstance(data, dict) else {}


def build_executor(ref) -> Executor:
    cls = registry.load("executors", ref.name)
    return cls(**ref.params)


def make_jobs(p, todo: list, attempts: dict[str, int], threads: int) -> list[CellJob]:
    """One job per cell, or with ``executor.share_teacher`` one per lockstep group."""
    ex = p.grid.config.executor
    if ex.share_teacher:
        from kdbench.engine.lockstep import plan_groups

        groups = plan_groups(todo)
    else:
        groups = [[c] for c in todo]
    return [
        CellJob(
            g[0].model_dump(mode="json"),
            str(p.run_dir),
            attempts[g[0].id],
            threads,
            ex.time_limit,
            tuple(c.model_dump(mode="json") for c in g[1:]),
            tuple(attempts[c.id] for c in g[1:]),
        )
        for g in groups
    ]


def run_external(
    p,
    store: Store,
    todo: list,
    attempts: dict[str, int],
    threads: int,
    counts: dict[str, int],
    console: Console,
    detach: bool,
) -> None:
    """Run (or with ``detach`` submit) ``todo`` on the plan's executor; tally results as they come."""
    from kdbench.runner import _tally

    ex = build_executor(p.executor)
    if detach and not ex.detachable:
        raise ConfigError(
            f"executor {p.executor.name!r} cannot detach; "
            "use `executor: {kind: submitit}` or run without --detach"
        )
    submitted = read_jobs(p.run_dir)
    mine = {
        c.id: submitted[c.id]["job"]
        for c in todo
        if c.id in submitted and submitted[c.id].get("executor") == p.executor.name
    }
    running = {cid for cid, up in ex.alive(mine).items() if up} if mine else set()
    if running:
        console.print(
            f"[dim]{len(running)} cell(s) still queued or running under {p.executor.name}; "
            "not resubmitted[/dim]"
        )
    counts["running"] = len(running)
    todo = [c for c in todo if c.id not in running]
    jobs = make_jobs(p, todo, attempts, threads)
    if not jobs:
        return
    if detach:
        ids = ex.submit(jobs)
        now = time.time()
        for j in jobs:
            for cid in j.ids:
                submitted[cid] = {
                    "executor": p.executor.name,
                    "job": ids.get(cid),
                    "attempt": attempts[cid],
                    "submitted": now,
                    "by": f"{platform.node()}:{os.getpid()}",
                }
        write_json_atomic(p.run_dir / JOBS_FILE, submitted)
        counts["submitted"] = sum(len(j.ids) for j in jobs)
        console.print(
            f"submitted {counts['submitted']} cell(s) to {p.executor.name}; `kdbench status {p.run_dir}` "
            "shows them and `kdbench run` again collects the results"
        )
        return
    n = sum(len(j.ids) for j in jobs)
    shared = f" as {len(jobs)} job(s) sharing teachers" if n > len(jobs) else ""
    console.print(f"[dim]running {n} cell(s){shared} on {p.executor.name}[/dim]")
    ex.run(jobs, lambda r: _tally(r, store, counts, console))


# ------------------------------------------------------------------------------ status


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_state(run_dir: Path, row: dict[str, Any], jobs: dict[str, dict]) -> tuple[str, str]:
    """(state, where) of one cell from the store row and its directory."""
    cdir = Path(run_dir) / "cells" / row["id"]
    if (cdir / "result.json").exists():
        try:
            r = json.loads((cdir / "result.json").read_text())
            return r.get("status", row["status"]), ""
        except ValueError:
            pass
    if row["status"] == "done":
        return "done", ""
    worker = cdir / "worker.json"
    if worker.exists():
        try:
            w = json.loads(worker.read_text())
        except ValueError:
            w = {}
        where = f"{w.get('host')} pid {w.get('pid')}"
        if w.get("host") == platform.node() and not _pid_alive(int(w.get("pid", 0))):
            return "interrupted", where + " (gone)"
        ckpt = cdir / "checkpoint.pt"
        if ckpt.exists():
            where += f", checkpoint {time.time() - ckpt.stat().st_mtime:.0f} s old"
        return "running", where
    if row["id"] in jobs:
        j = jobs[row["id"]]
        return "submitted", f"{j.get('executor')} job {j.get('job')}"
    return row["status"], ""


def status_table(run_dir: Path) -> str:
    """Every cell of the grid last run here (state, where, attempts, error) and the teachers."""
    from tabulate import tabulate

    from kdbench.report import current_cells

    run_dir = Path(run_dir)
    if not (run_dir / "results.sqlite").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no results.sqlite); run a grid first")
    store = Store.open_existing(run_dir / "results.sqlite")
    try:
        only = current_cells(run_dir)
        rows = [r for r in store.cells() if only is None or r["id"] in only]
        teachers = store.teachers()
    finally:
        store.close()
    jobs = read_jobs(run_dir)
    table, tally = [], {}
    for r in rows:
        cfg = r["config"]
        state, where = cell_state(run_dir, r, jobs)
        tally[state] = tally.get(state, 0) + 1
        err = (r.get("error") or "").splitlines()[-1][:80] if state == "failed" and r.get("error") else ""
        table.append(
            [
                r["id"][:10],
                cfg["method"]["label"],
                f"{cfg['teacher']['label']}→{cfg['student']['label']}",
                cfg["dataset"]["name"],
                cfg["seed"],
                state,
                where,
                r["attempts"],
                err,
            ]
        )
    lines = [
        tabulate(
            table,
            headers=["cell", "method", "pair", "dataset", "seed", "state", "where", "attempts", "error"],
            tablefmt="github",
        )
    ]
    lines.append("")
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(tally.items())) + f" — {len(rows)} cells")
    tdir = run_dir / "teachers"
    t_rows = []
    known = {t["id"]: t for t in teachers}
    ids = sorted({p.stem for p in tdir.glob("*.pt")} | set(known)) if tdir.exists() else sorted(known)
    for tid in ids:
        t = known.get(tid, {})
        top1 = (t.get("metrics") or {}).get("top1")
        cached = (tdir / f"{tid}.pt").exists()
        t_rows.append(
            [
                tid[:10],
                (t.get("config") or {}).get("label", "?"),
                "trained" if cached else "missing",
                f"{top1:.2f}" if isinstance(top1, (int, float)) else "–",
            ]
        )
    if t_rows:
        lines += ["", tabulate(t_rows, headers=["teacher", "model", "cache", "top1"], tablefmt="github")]
    return "\n".join(lines)


def print_status(run_dir: Path, console: Console) -> None:
    console.print(escape(status_table(run_dir)), highlight=False)
