"""``kdbench status RUN``: every cell of the grid last run here (state, where, attempts, error)
and the teachers, from the store and the cell directories.

The state logic lives here; the tables go through the reports' renderer, so the same view is
the ``status`` report kind (``kdbench report RUN --kind status --format csv|json|latex``)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from kdbench.errors import ConfigError
from kdbench.reports import ReportArgs, RunData
from kdbench.reports.render import NUMBER, TEXT, Cell, Column, Report, Statistic, Table, render_report
from kdbench.rundir import RunDir
from kdbench.store import Store


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running(cdir: Path) -> tuple[str, str] | None:
    """("running" | "interrupted", where) from a cell's ``worker.json``, or None."""
    try:
        w = json.loads((cdir / "worker.json").read_text())
    except OSError:
        return None
    except ValueError:
        w = {}
    where = f"{w.get('host')} pid {w.get('pid')}"
    if w.get("host") == platform.node() and not _pid_alive(int(w.get("pid", 0))):
        return "interrupted", where + " (gone)"
    ckpt = cdir / "checkpoint.pt"
    if ckpt.exists():
        where += f", checkpoint {time.time() - ckpt.stat().st_mtime:.0f} s old"
    return "running", where


def cell_state(rd: RunDir, row: dict[str, Any], jobs: dict[str, dict]) -> tuple[str, str]:
    """(state, where) of one cell from the store row and its directory."""
    on_disk = rd.read_result(row["id"])
    if on_disk is not None:
        return on_disk.get("status", row["status"]), ""
    if row["status"] == "done":
        return "done", ""
    running = _running(rd.cell_dir(row["id"]))
    if running is not None:
        return running
    if row["id"] in jobs:
        j = jobs[row["id"]]
        return "submitted", f"{j.get('executor')} job {j.get('job')}"
    return row["status"], ""


CELL_COLUMNS = [
    Column("cell", kind=TEXT),
    Column("method", kind=TEXT),
    Column("pair", kind=TEXT),
    Column("dataset", kind=TEXT),
    Column("seed", kind=NUMBER),
    Column("state", kind=TEXT),
    Column("where", kind=TEXT),
    Column("attempts", kind=NUMBER),
    Column("error", kind=TEXT),
]
TEACHER_COLUMNS = [
    Column("teacher", kind=TEXT),
    Column("model", kind=TEXT),
    Column("cache", kind=TEXT),
    Column("top1", kind=NUMBER),
]


def _cell_rows(rd: RunDir, rows: list[dict]) -> tuple[list[list[Cell]], dict[str, int]]:
    """One line per cell (its state from the store and its directory), and the count per state."""
    jobs = rd.read_jobs()
    table: list[list[Cell]] = []
    tally: dict[str, int] = {}
    for r in rows:
        cfg = r["config"]
        state, where = cell_state(rd, r, jobs)
        tally[state] = tally.get(state, 0) + 1
        err = (r.get("error") or "").splitlines()[-1][:80] if state == "failed" and r.get("error") else ""
        pair = f"{cfg['teacher']['label']}→{cfg['student']['label']}"
        table.append([r["id"][:10], cfg["method"]["label"], pair, cfg["dataset"]["name"], cfg["seed"]])
        table[-1] += [state, where, r["attempts"], err]
    return table, tally


def _teacher_rows(rd: RunDir, teachers: list[dict]) -> list[list[Cell]]:
    """One line per teacher the store knows or the cache holds."""
    known = {t["id"]: t for t in teachers}
    on_disk = {p.stem for p in rd.teachers.glob("*.pt")} if rd.teachers.exists() else set()
    rows: list[list[Cell]] = []
    for tid in sorted(on_disk | set(known)):
        t = known.get(tid, {})
        top1 = (t.get("metrics") or {}).get("top1")
        cached = (rd.teachers / f"{tid}.pt").exists()
        label = (t.get("config") or {}).get("label", "?")
        top1 = float(top1) if isinstance(top1, int | float) else None
        rows.append([tid[:10], label, "trained" if cached else "missing", Statistic(top1, missing="–")])
    return rows


def status_report(rd: RunDir, rows: list[dict], teachers: list[dict]) -> Report:
    """The cells (state, where, attempts, error) with the count per state, and the teachers."""
    table, tally = _cell_rows(rd, rows)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(tally.items())) + f" — {len(rows)} cells"
    tables = [Table("", CELL_COLUMNS, table, notes=[summary])]
    t_rows = _teacher_rows(rd, teachers)
    if t_rows:
        tables.append(Table("", TEACHER_COLUMNS, t_rows))
    return Report(tables, records=tables[0])  # CSV: one line per cell


def build(run: RunData, args: ReportArgs) -> Report:
    """The ``status`` report kind: :func:`status_report` over the cells a report reads."""
    return status_report(RunDir(run.run_dir), run.cells, list(run.teachers.values()))


def status_table(run_dir: Path) -> str:
    """Every cell of the grid last run here (state, where, attempts, error) and the teachers."""
    from kdbench.report import current_cells

    rd = RunDir(run_dir)
    if not (rd.path / RunDir.STORE).exists():
        raise ConfigError(f"{run_dir} is not a run directory (no results.sqlite); run a grid first")
    store = Store.open_existing(rd.path / RunDir.STORE)
    try:
        only = current_cells(rd.path)
        rows = [r for r in store.cells() if only is None or r["id"] in only]
        teachers = store.teachers()
    finally:
        store.close()
    return render_report(status_report(rd, rows, teachers), "github")


def print_status(run_dir: Path, console: Console) -> None:
    console.print(escape(status_table(run_dir)), highlight=False)
