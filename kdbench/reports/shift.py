"""``kdbench report RUN --kind shift``: where a student's errors under a spurious shift come from.

Per (dataset, pair), from the store alone:

1. **Error decomposition** per method and group (test set): the student's error splits into
   errors it *inherits* (the teacher is wrong on the sample too) and its *own* (the teacher
   is right); the teacher's own error and the student–teacher disagreement are shown beside
   them. Summary rows give the method's worst group and the mean over groups.
2. **Train vs test** accuracy per group: the in-distribution (training split) accuracy, the
   test accuracy and the gap, for students and the teacher.
3. **Spurious-feature scan**: how strongly the pooled penultimate features separate the
   attribute values within a class (Cohen's d per dimension, averaged over classes and pairs
   of values; see ``kdbench.engine.groups.feature_scan``): max and mean over dimensions and
   the top dimensions, teacher and students side by side.

Numbers are means over seeds. Metrics come from the group family and hook
(``group/<g>/{acc,teacher_acc,agreement,err_inherited,err_own}``, ``train/group/<g>/acc``,
``scan/*``).
"""

from __future__ import annotations

from typing import Any

from kdbench.errors import KdbenchError
from kdbench.reports import ReportArgs, RunData, footer
from kdbench.reports.groups import group_names, group_sizes
from kdbench.reports.leaderboard import TEACHER_ROW, VARIANTS, Board, build_board
from kdbench.reports.render import STAT, TEXT, Cell, Column, Report, Statistic, Table

TOP_DIMS = 5


def _mean(board: Board, row: str, col: str, metric: str) -> float | None:
    s = board.stat(row, col, metric)
    return s.mean if s.n else None


def _avg(vs: list[float | None]) -> float | None:
    got = [v for v in vs if v is not None]
    return sum(got) / len(got) if got else None


def group_rows(board: Board, row: str, col: str, groups: list[str]) -> list[dict[str, Any]]:
    """Per group: acc, err, teacher err, inherited, own, disagreement, train acc, gap."""
    out = []
    for g in groups:
        acc = _mean(board, row, col, f"group/{g}/acc")
        if acc is None:
            continue
        train = _mean(board, row, col, f"train/group/{g}/acc")
        if row == TEACHER_ROW:
            t_acc, inh, own, agree = acc, None, None, None
        else:
            t_acc = _mean(board, row, col, f"group/{g}/teacher_acc")
            if t_acc is None:  # a teacher-free student (ce): the grid's teacher on its own test set
                t_acc = _mean(board, TEACHER_ROW, col, f"group/{g}/acc")
            inh = _mean(board, row, col, f"group/{g}/err_inherited")
            own = _mean(board, row, col, f"group/{g}/err_own")
            agree = _mean(board, row, col, f"group/{g}/agreement")
        out.append(
            {
                "group": g,
                "acc": acc,
                "err": 100.0 - acc,
                "teacher_err": None if t_acc is None else 100.0 - t_acc,
                "inherited": inh,
                "own": own,
                "disagreement": None if agree is None else 100.0 - agree,
                "train_acc": train,
                "gap": None if train is None else train - acc,
            }
        )
    return out


def scan_row(board: Board, row: str, col: str) -> dict[str, Any] | None:
    mx, mean = board.stat(row, col, "scan/max"), board.stat(row, col, "scan/mean")
    if not mx.n:
        return None
    dims = []
    for r in range(1, TOP_DIMS + 1):
        d, s = board.stat(row, col, f"scan/top{r}/dim"), board.stat(row, col, f"scan/top{r}/score")
        if d.n and s.n:
            dims.append((int(d.values[0]), s.values[0]))  # the first seed's model
    return {"max": mx.mean, "mean": mean.mean, "n": mx.n, "top": dims}


def analyse(board: Board, args: ReportArgs) -> list[dict[str, Any]]:
    out = []
    rows = [r for r in board.rows if not any(r.endswith("+" + v) for v in VARIANTS)]
    for col in board.columns:
        groups = group_names(board, col, "test")
        if not groups:
            continue
        per = {r: group_rows(board, r, col, groups) for r in rows}
        per = {r: v for r, v in per.items() if v}
        scans = {r: s for r in rows if (s := scan_row(board, r, col)) is not None}
        out.append(
            {
                "column": col,
                "sizes": group_sizes(board, col, "test", groups),
                "groups": per,
                "scan": scans,
            }
        )
    return out


def _summary(rows: list[dict[str, Any]]) -> list[Cell]:
    worst = min(rows, key=lambda r: r["acc"])
    keys = ("err", "teacher_err", "inherited", "own", "disagreement", "gap")
    means = [_num(_avg([r[k] for r in rows])) for k in keys]
    return [worst["group"], *(_num(worst[k]) for k in keys), *means]


#: per-group columns of the csv and the per-group table: (record key, text header)
GROUP_COLUMNS = (
    ("err", "err"),
    ("teacher_err", "teacher err"),
    ("inherited", "inherited"),
    ("own", "own"),
    ("disagreement", "disagree"),
    ("train_acc", "train acc"),
    ("acc", "test acc"),
    ("gap", "train−test"),
)
DETAIL_HEAD = ["method", "group", "n", *(h for _, h in GROUP_COLUMNS)]
SUMMARY_HEAD = ["method", "worst group", "err", "teacher err", "inherited", "own", "disagree", "train−test"]
SUMMARY_HEAD += [f"mean {h}" for h in ("err", "teacher err", "inherited", "own", "disagree", "train−test")]


def build(run: RunData, args: ReportArgs) -> Report:
    """The ``shift`` report kind."""
    board = build_board(run, args)
    recs = analyse(board, args)
    if not recs:
        raise KdbenchError(
            f"no per-group metrics in {run.run_dir}: the shift report needs a dataset with groups "
            "(spurious, waterbirds, celeba, spuco_birds)"
        )
    notes = footer(run.protocol(args)) + [
        "err = inherited (teacher also wrong) + own (teacher right); teacher err and disagreement are on the "
        "student's test set; train−test = accuracy on the training split minus test accuracy"
    ]
    return Report(
        [t for r in recs for t in _tables(r)],
        list(notes),
        records=_records(recs),
        data=[{k: r[k] for k in ("column", "sizes", "groups", "scan")} for r in recs],
    )


def _records(recs: list[dict]) -> Table:
    keys = ("acc", "err", "teacher_err", "inherited", "own", "disagreement", "train_acc", "gap")
    rows: list[list[Cell]] = [
        [r["column"], method, g["group"], r["sizes"].get(g["group"])] + [g[k] for k in keys]
        for r in recs
        for method, rows in r["groups"].items()
        for g in rows
    ]
    return Table("", [Column(n, kind=TEXT) for n in ("column", "method", "group", "n", *keys)], rows)


def _num(v: float | None, digits: int = 1) -> Statistic:
    return Statistic(v, digits=digits)


def _columns(names: list[str], labels: int = 1) -> list[Column]:
    """``names`` as columns, the first ``labels`` of them labels, the rest statistics."""
    return [Column(n, kind=TEXT if i < labels else STAT) for i, n in enumerate(names)]


def _tables(r: dict) -> list[Table]:
    """One column's tables: the summary, the per-group detail and the feature scan."""
    col = r["column"]
    body = [[m] + _summary(rows) for m, rows in r["groups"].items()]
    detail = [
        [m, g["group"], str(r["sizes"].get(g["group"], "?"))] + [_num(g[k]) for k, _ in GROUP_COLUMNS]
        for m, rows in r["groups"].items()
        for g in rows
    ]
    out = [
        Table(
            f"{col} — error decomposition on test (%): worst group of each method, and mean over groups",
            _columns(SUMMARY_HEAD, 2),
            body,
        ),
        Table(f"{col} — per group (%)", _columns(DETAIL_HEAD, 3), detail),
    ]
    if r["scan"]:
        scan: list[list[Cell]] = [
            [m, _num(s["max"], 2), _num(s["mean"], 3), ", ".join(f"{d}:{v:.2f}" for d, v in s["top"])]
            for m, s in r["scan"].items()
        ]
        out.append(
            Table(
                f"{col} — spurious-feature scan of pooled features (Cohen's d between attribute values "
                "within a class; higher = the attribute is more linearly visible)",
                _columns(["model", "max d", "mean d"])
                + [Column(f"top {TOP_DIMS} dims (first seed)", kind=TEXT)],
                scan,
            )
        )
    return out
