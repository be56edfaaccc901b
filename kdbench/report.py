"""``kdbench report``: tables from a run directory's store alone (nothing is re-run).

Opens the run's store, keeps the cells of the grid last run there (``--all``: every stored
cell; the grid and the ids of its cells are kept in the store, or, for runs made before, in
``grid.yaml`` and ``cells.json``), and hands them to a report kind (:mod:`kdbench.reports`; the default is the
leaderboard, :mod:`kdbench.reports.leaderboard`).
"""

from __future__ import annotations

import json
from pathlib import Path

from kdbench.cells import CELL_FORMAT, CellFormatError
from kdbench.errors import KdbenchError
from kdbench.reports import FORMATS, ReportArgs, RunData, load
from kdbench.reports.leaderboard import TEACHER_ROW, Board, Stat, build_board, column_label, render_board
from kdbench.store import META_CELLS, META_GRID, META_LAST_RUN, Store

__all__ = [
    "FORMATS",
    "TEACHER_ROW",
    "Board",
    "ReportArgs",
    "RunData",
    "Stat",
    "build_board",
    "column_label",
    "current_cells",
    "open_run",
    "render_board",
    "report",
]


def current_cells(run_dir: Path) -> set[str] | None:
    """Ids of the cells of the grid last run in ``run_dir`` (None if unknown), from ``cells.json``."""
    f = Path(run_dir) / "cells.json"
    return set(json.loads(f.read_text())) if f.exists() else None


def _grid_text(run_dir: Path, store: Store) -> str | None:
    """The text of the grid last run here: from the store, else (older runs) ``grid.yaml``."""
    text = store.get_meta(META_GRID)
    if text is None and (Path(run_dir) / "grid.yaml").exists():
        text = (Path(run_dir) / "grid.yaml").read_text()
    return text


def _grid(text: str | None) -> dict:
    """The grid, parsed (only presentation keys such as ``reference`` are read)."""
    if not text:
        return {}
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KdbenchError(f"the grid stored with this run does not parse ({e}); run it again") from None
    return data if isinstance(data, dict) else {}


def _current(run_dir: Path, store: Store) -> set[str] | None:
    ids = store.get_meta(META_CELLS)
    return set(json.loads(ids)) if ids is not None else current_cells(run_dir)


def open_run(run_dir: Path, everything: bool = False) -> RunData:
    """Everything a report reads, from the store of ``run_dir``.

    Cells of an earlier version of the grid (other epochs, say) share row and column names
    with the current ones, so mixing them would average different experiments: only the
    grid last run is kept unless ``everything``.
    """
    run_dir = Path(run_dir)
    store = Store.open_existing(run_dir / "results.sqlite")
    try:
        only = None if everything else _current(run_dir, store)
        cells = [c for c in store.cells() if only is None or c["id"] in only]
        for c in cells:
            fmt = c["config"].get("format")
            if fmt is not None and fmt != CELL_FORMAT:  # another kdbench wrote it: keys may differ
                raise CellFormatError(f"the store of {run_dir} (cell {c['id']})", fmt)
        teachers = {t["id"]: t for t in store.teachers()}
        epochs = {c["id"]: rows for c in cells if (rows := store.epochs(c["id"])) is not None}
        grid = _grid(_grid_text(run_dir, store))
        last = store.get_meta(META_LAST_RUN)
    finally:
        store.close()
    try:
        last_run = json.loads(last) if last else {}
    except ValueError:
        last_run = {}
    return RunData(
        run_dir, cells, teachers, grid, epochs, last_run=last_run if isinstance(last_run, dict) else {}
    )


def report(
    run_dir: Path,
    fmt: str = "github",
    metric: str = "top1",
    details: bool = False,
    everything: bool = False,
    *,
    select: str = "last",
    spread: str = "std",
    baseline: str | None = None,
    kind: str = "leaderboard",
    plot: str | None = None,
) -> str:
    """The ``kind`` report of the grid last run in ``run_dir``."""
    args = ReportArgs(fmt, metric, select, spread, baseline, details, everything, kind, plot)
    args.check()
    render = load(kind)
    run = open_run(run_dir, everything)
    if not run.cells:
        raise KdbenchError(f"{run_dir} holds no cells yet")
    if fmt == "html":  # a standalone page, laid out above the table renderers
        import importlib

        from kdbench.report_choices import KINDS
        from kdbench.reports.html import render_kind

        return render_kind(kind, importlib.import_module(KINDS[kind]).build, run, args)
    return render(run, args)
