"""Leaderboards from the results store alone (nothing is re-run).

One row per method, one column per (dataset, teacher→student); a cell is ``mean ± std (n)``
over seeds, the best method per column is marked. The teacher and the ``ce`` student
(trained without a teacher) are reference rows. Formats: github (Markdown), latex
(booktabs, best in bold), csv, json.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from kdbench.errors import KdbenchError
from kdbench.store import Store

FORMATS = ("github", "latex", "csv", "json")
#: metrics shown per cell in the detail table, with whether higher is better
METRICS = {"top1": True, "top5": True, "agreement": True, "ece": False, "nll": False, "wall_s": False}
TEACHER_ROW = "teacher"


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (0 for a single seed)."""
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))


@dataclass
class Board:
    """The leaderboard as data: stats[row][column][metric]."""

    rows: list[str]
    columns: list[str]
    stats: dict[str, dict[str, dict[str, Stat]]]
    failed: int = 0
    pending: int = 0

    def best(self, column: str, metric: str = "top1") -> str | None:
        higher = METRICS.get(metric, True)
        cands = [
            (r, self.stats[r][column][metric].mean)
            for r in self.rows
            if r != TEACHER_ROW and column in self.stats[r] and metric in self.stats[r][column]
        ]
        if not cands:
            return None
        return (max if higher else min)(cands, key=lambda rv: rv[1])[0]


def column_label(cfg: dict) -> str:
    return f"{cfg['dataset']['name']}: {cfg['teacher']['label']}→{cfg['student']['label']}"


def build_board(store: Store, only: set[str] | None = None) -> Board:
    """Aggregate the store's cells (those with ids in ``only``, when given) into a board."""
    stats: dict[str, dict[str, dict[str, Stat]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(Stat)))
    columns: list[str] = []
    rows: list[str] = []
    teacher_ids: dict[str, set[str]] = defaultdict(set)
    failed = pending = 0
    cells = [c for c in store.cells() if only is None or c["id"] in only]
    for c in sorted(cells, key=lambda c: (c["config"]["dataset"]["name"], c["config"]["seed"])):
        cfg = c["config"]
        col = column_label(cfg)
        if col not in columns:
            columns.append(col)
        row = cfg["method"]["label"]
        if row not in rows:
            rows.append(row)
        if c["status"] == "failed":
            failed += 1
            continue
        if c["status"] != "done" or not c["metrics"]:
            pending += 1
            continue
        for m, v in c["metrics"].items():
            if isinstance(v, int | float):
                stats[row][col][m].values.append(float(v))
        if cfg.get("uses_teacher"):
            teacher_ids[col].add(cfg["teacher"]["id"])
    teachers = {t["id"]: t for t in store.teachers()}
    for col, ids in teacher_ids.items():
        for tid in sorted(ids):
            t = teachers.get(tid)
            if t and t["metrics"]:
                for m, v in t["metrics"].items():
                    if isinstance(v, int | float):
                        stats[TEACHER_ROW][col][m].values.append(float(v))
                if t.get("wall_s") is not None:
                    stats[TEACHER_ROW][col]["wall_s"].values.append(float(t["wall_s"]))
    # reference rows first: teacher, then the teacher-free student, then methods in grid order
    order = (
        ([TEACHER_ROW] if TEACHER_ROW in stats else [])
        + [r for r in rows if r == "ce"]
        + [r for r in rows if r != "ce"]
    )
    return Board(order, columns, stats, failed, pending)


def _fmt(s: Stat, digits: int = 2) -> str:
    if s.n == 0:
        return "—"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} ({s.n})"


def _table(board: Board, metric: str, bold: str, esc=lambda s: s) -> list[list[str]]:
    out = []
    best = {c: board.best(c, metric) for c in board.columns}
    for r in board.rows:
        line = [esc(r)]
        for c in board.columns:
            s = board.stats.get(r, {}).get(c, {}).get(metric, Stat())
            cell = esc(_fmt(s))
            if r == best[c] and s.n:
                cell = bold.format(cell)
            line.append(cell)
        out.append(line)
    return out


def _latex_escape(s: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("→", r"$\rightarrow$"),
        ("±", r"$\pm$"),
    ):
        s = s.replace(a, b)
    return s


def render(board: Board, fmt: str = "github", metric: str = "top1") -> str:
    if fmt not in FORMATS:
        raise KdbenchError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(to_records(board), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "column", "metric", "mean", "std", "n", "best"])
        for rec in to_records(board):
            for m, s in rec["metrics"].items():
                w.writerow(
                    [
                        rec["method"],
                        rec["column"],
                        m,
                        f"{s['mean']:.6g}",
                        f"{s['std']:.6g}",
                        s["n"],
                        int(rec["best"] and m == metric),
                    ]
                )
        return buf.getvalue()
    if fmt == "latex":
        rows = _table(board, metric, r"\textbf{{{}}}", _latex_escape)
        head = ["Method"] + [_latex_escape(c) for c in board.columns]
        lines = [
            r"\begin{tabular}{l" + "c" * len(board.columns) + "}",
            r"\toprule",
            " & ".join(head) + r" \\",
            r"\midrule",
        ]
        for i, r in enumerate(rows):
            lines.append(" & ".join(r) + r" \\")
            refs = (TEACHER_ROW, "ce")
            if r[0] in refs and i + 1 < len(rows) and rows[i + 1][0] not in refs:
                lines.append(r"\midrule")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)
    rows = _table(board, metric, "**{}**")
    text = tabulate(rows, headers=[f"method ({metric})"] + board.columns, tablefmt="github")
    notes = []
    if board.failed:
        notes.append(f"{board.failed} cell(s) failed")
    if board.pending:
        notes.append(f"{board.pending} cell(s) not run yet")
    return text + ("\n\n" + "; ".join(notes) if notes else "")


def render_details(board: Board) -> str:
    """Every metric per (method, column), mean ± std over seeds."""
    rows = []
    for r in board.rows:
        for c in board.columns:
            st = board.stats.get(r, {}).get(c, {})
            if not st:
                continue
            rows.append([r, c] + [_fmt(st[m]) if m in st else "—" for m in METRICS])
    return tabulate(rows, headers=["method", "column"] + list(METRICS), tablefmt="github")


def to_records(board: Board, metric: str = "top1") -> list[dict[str, Any]]:
    out = []
    for c in board.columns:
        best = board.best(c, metric)
        for r in board.rows:
            st = board.stats.get(r, {}).get(c, {})
            if not st:
                continue
            out.append(
                {
                    "method": r,
                    "column": c,
                    "best": r == best,
                    "metrics": {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in st.items() if s.n},
                }
            )
    return out


def current_cells(run_dir: Path) -> set[str] | None:
    """Ids of the cells of the grid last run in ``run_dir`` (None if unknown)."""
    f = Path(run_dir) / "cells.json"
    return set(json.loads(f.read_text())) if f.exists() else None


def report(
    run_dir: Path, fmt: str = "github", metric: str = "top1", details: bool = False, everything: bool = False
) -> str:
    """The leaderboard of the grid last run in ``run_dir`` (``everything``: every cell ever stored).

    Cells of an earlier version of the grid (other epochs, say) share row and column names
    with the current ones, so mixing them would average different experiments.
    """
    store = Store.open_existing(Path(run_dir) / "results.sqlite")
    try:
        board = build_board(store, None if everything else current_cells(run_dir))
    finally:
        store.close()
    if not board.columns:
        raise KdbenchError(f"{run_dir} holds no cells yet")
    text = render(board, fmt, metric)
    if details and fmt == "github":
        text += "\n\n" + render_details(board)
    return text
