"""``kdbench report RUN --kind corruptions``: accuracy under common corruptions, per method.

One table per (dataset, pair): rows are methods, columns the corruptions the run evaluated
(top-1 averaged over severities and seeds), then the clean top-1, the mean corruption accuracy
(``corruption_acc``: the mean over every corruption × severity set, RobustBench's convention),
the relative drop, and Hendrycks & Dietterich's mCE and relative mCE normalised by a baseline
row (``--baseline``, default ``ce``: AlexNet's errors, the paper's normaliser, mean nothing here):

    CE_c   = Σ_s E_{c,s} / Σ_s E^base_{c,s}
    relCE_c = Σ_s (E_{c,s} − E_clean) / Σ_s (E^base_{c,s} − E^base_clean)

with E = 100 − top-1 (means over seeds), both averaged over corruptions and shown in %.
``--plot out.png`` draws accuracy vs severity (mean over corruptions; severity 0 = clean),
one line per method, one panel per (dataset, pair).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.reports import ReportArgs, RunData, footer
from kdbench.reports.leaderboard import TEACHER_ROW, Board, build_board
from kdbench.reports.render import TEXT, Cell, Column, Report, Statistic, Table

_SET = re.compile(r"^c/(?P<name>[^/]+)/(?P<sev>\d+)/top1$")
#: short column names
SHORT = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impulse",
    "defocus_blur": "defocus",
    "glass_blur": "glass",
    "motion_blur": "motion",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "bright",
    "contrast": "contrast",
    "elastic_transform": "elastic",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
}


def _order(name: str) -> tuple[int, str]:
    names = list(SHORT)
    return (names.index(name) if name in names else len(names), name)


def _mean(board: Board, row: str, col: str, metric: str) -> float:
    s = board.stat(row, col, metric)
    return s.mean if s.n else math.nan


def table(board: Board, col: str, baseline: str) -> dict[str, Any] | None:
    """The numbers of one column: corruptions, severities, and per-row results."""
    found: dict[str, set[int]] = {}
    for r in board.rows:
        for m in board.stats.get(r, {}).get(col, {}):
            hit = _SET.match(m)
            if hit:
                found.setdefault(hit["name"], set()).add(int(hit["sev"]))
    if not found:
        return None
    names = sorted(found, key=_order)
    sevs = sorted(set().union(*found.values()))
    rows = []
    for r in board.rows:
        acc = {(c, s): _mean(board, r, col, f"c/{c}/{s}/top1") for c in names for s in sevs}
        if all(math.isnan(v) for v in acc.values()):
            continue
        clean = _mean(board, r, col, "top1")
        per_c = {c: _nanmean([acc[c, s] for s in sevs]) for c in names}
        mean = _nanmean(list(acc.values()))
        s_mean = board.stat(r, col, "corruption_acc")
        rows.append(
            {
                "method": r,
                "acc": acc,
                "per_corruption": per_c,
                "clean": clean,
                "corruption_acc": s_mean.mean if s_mean.n else mean,
                "corruption_acc_spread": s_mean.spread("std") if s_mean.n else math.nan,
                "n": s_mean.n,
                "rel_drop": 100.0 * (clean - mean) / clean if clean and not math.isnan(clean) else math.nan,
                "by_severity": {s: _nanmean([acc[c, s] for c in names]) for s in sevs},
            }
        )
    teacher = _teacher_row(board, col, names, sevs)
    if teacher is not None:
        rows = [x for x in rows if x["method"] != TEACHER_ROW]
        rows.insert(0, teacher)
    base = next((x for x in rows if x["method"] == baseline), None)
    for x in rows:
        x["mCE"], x["rel_mCE"] = _mce(x, base, names, sevs) if base is not None else (math.nan, math.nan)
    rel = rel_corruptions(base, names, sevs) if base is not None else []
    return {
        "column": col,
        "corruptions": names,
        "severities": sevs,
        "rows": rows,
        "baseline": baseline,
        "rel_corruptions": rel,
    }


def _teacher_row(board: Board, col: str, names: list[str], sevs: list[int]) -> dict[str, Any] | None:
    """The teacher's accuracies, from the ``teacher_top1`` the cells that use it recorded."""
    acc = {}
    for c in names:
        for s in sevs:
            vals = [v for r in board.rows for v in board.stat(r, col, f"c/{c}/{s}/teacher_top1").values]
            acc[c, s] = sum(vals) / len(vals) if vals else math.nan
    if all(math.isnan(v) for v in acc.values()):
        return None
    clean = _mean(board, TEACHER_ROW, col, "top1")
    mean = _nanmean(list(acc.values()))
    return {
        "method": TEACHER_ROW,
        "acc": acc,
        "per_corruption": {c: _nanmean([acc[c, s] for s in sevs]) for c in names},
        "clean": clean,
        "corruption_acc": mean,
        "corruption_acc_spread": math.nan,
        "n": 1,
        "rel_drop": 100.0 * (clean - mean) / clean if clean and not math.isnan(clean) else math.nan,
        "by_severity": {s: _nanmean([acc[c, s] for c in names]) for s in sevs},
    }


def _nanmean(vals: list[float]) -> float:
    v = [x for x in vals if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


#: relative CE needs the baseline to lose accuracy under a corruption: at least this many
#: points of top-1, averaged over severities (else the ratio is noise over almost zero)
REL_MIN_DROP = 1.0


def rel_corruptions(base: dict, names: list[str], sevs: list[int]) -> list[str]:
    """The corruptions that cost the baseline at least :data:`REL_MIN_DROP` points on average."""
    out = []
    for c in names:
        drops = [base["clean"] - base["acc"][c, s] for s in sevs]
        if not any(math.isnan(v) for v in drops) and sum(drops) / len(drops) >= REL_MIN_DROP:
            out.append(c)
    return out


def _mce(row: dict, base: dict, names: list[str], sevs: list[int]) -> tuple[float, float]:
    """(mCE, relative mCE) in % of ``base`` (errors are 100 − top-1).

    Relative mCE averages only over :func:`rel_corruptions` (where the baseline degrades).
    """
    ces, rels = [], []
    rel_ok = set(rel_corruptions(base, names, sevs))
    for c in names:
        e = [100.0 - row["acc"][c, s] for s in sevs]
        b = [100.0 - base["acc"][c, s] for s in sevs]
        if any(math.isnan(v) for v in e + b):
            continue
        if sum(b) > 0:
            ces.append(sum(e) / sum(b))
        e0, b0 = 100.0 - row["clean"], 100.0 - base["clean"]
        if c in rel_ok and not math.isnan(e0):
            rels.append(sum(v - e0 for v in e) / sum(v - b0 for v in b))
    return (100.0 * _nanmean(ces) if ces else math.nan, 100.0 * _nanmean(rels) if rels else math.nan)


def _check_baseline(recs: list[dict[str, Any]], baseline: str | None) -> None:
    if baseline and not any(x["method"] == baseline for t in recs for x in t["rows"]):
        have = sorted({x["method"] for t in recs for x in t["rows"]})
        raise KdbenchError(f"--baseline {baseline!r} is not a row here; rows: {', '.join(have)}")


def _notes(recs: list[dict[str, Any]], baseline: str) -> list[str]:
    """What the columns mean, and the corruptions left out of each column's relative mCE."""
    notes = [
        "corruption acc: mean top-1 over every corruption × severity set (RobustBench), "
        "mean ± sample std over seeds; rel. drop: 100·(clean − corruption acc)/clean",
        f"mCE / rel. mCE (Hendrycks & Dietterich 2019): errors summed over severities, divided by the "
        f"{baseline!r} row's (relative: minus each row's clean error), averaged over corruptions",
    ]
    for t in recs:
        left = [SHORT.get(c, c) for c in t["corruptions"] if c not in t["rel_corruptions"]]
        if left:
            notes.append(
                f"{t['column']}: rel. mCE over {len(t['rel_corruptions'])} of {len(t['corruptions'])} "
                f"corruptions; {', '.join(left)} cost {baseline!r} under {REL_MIN_DROP:g} point(s) of "
                "top-1, too little to normalise by"
            )
    return notes


def build(run: RunData, args: ReportArgs) -> Report:
    """The ``corruptions`` report kind."""
    board = build_board(run, args)
    baseline = args.baseline or "ce"
    recs = [t for t in (table(board, col, baseline) for col in board.columns) if t is not None]
    if not recs:
        raise KdbenchError(
            f"no corruption metrics (c/<corruption>/<severity>/top1) in {run.run_dir}: set "
            "`eval: {corruptions: all}` in the grid and run it again"
        )
    _check_baseline(recs, args.baseline)
    if args.plot:
        plot(recs, Path(args.plot))
    notes = footer(run.protocol(args)) + _notes(recs, baseline)
    if args.plot:
        notes.append(f"plot: {args.plot}")
    return Report(
        [_table(t, baseline) for t in recs],
        list(notes),
        records=_records(recs),
        data=[_json(t) for t in recs],
    )


def _table(t: dict[str, Any], baseline: str) -> Table:
    head = [Column("method", kind=TEXT)] + [Column(SHORT.get(c, c)) for c in t["corruptions"]]
    head += [Column(h) for h in ("clean", "corruption acc", "rel. drop", f"mCE ({baseline}=100)", "rel. mCE")]
    body: list[list[Cell]] = [
        [x["method"]]
        + [Statistic(x["per_corruption"][c], digits=1) for c in t["corruptions"]]
        + [
            Statistic(x["clean"]),
            Statistic(x["corruption_acc"], x["corruption_acc_spread"]),
            Statistic(x["rel_drop"], digits=1),
            Statistic(x["mCE"], digits=1),
            Statistic(x["rel_mCE"], digits=1),
        ]
        for x in t["rows"]
    ]
    sev = ", ".join(map(str, t["severities"]))
    return Table(f"{t['column']} — top-1 (%) under corruption, mean over severities {sev}", head, body)


def _json(t: dict[str, Any]) -> dict[str, Any]:
    return {
        "column": t["column"],
        "baseline": t["baseline"],
        "corruptions": t["corruptions"],
        "rel_mCE_corruptions": t["rel_corruptions"],
        "severities": t["severities"],
        "rows": [
            {
                "method": x["method"],
                "clean": x["clean"],
                "corruption_acc": x["corruption_acc"],
                "corruption_rel_drop": x["rel_drop"],
                "mCE": x["mCE"],
                "rel_mCE": x["rel_mCE"],
                "per_corruption": x["per_corruption"],
                "by_severity": {str(s): v for s, v in x["by_severity"].items()},
                "acc": {f"{c}/{s}": v for (c, s), v in x["acc"].items()},
            }
            for x in t["rows"]
        ],
    }


def _records(recs: list[dict[str, Any]]) -> Table:
    rows: list[list[Cell]] = []
    for t in recs:
        for x in t["rows"]:
            rows += [[t["column"], x["method"], c, sev, v] for (c, sev), v in x["acc"].items()]
            keys = ("clean", "corruption_acc", "rel_drop", "mCE", "rel_mCE")
            rows += [[t["column"], x["method"], key, None, x[key]] for key in keys]
    names = ("column", "method", "corruption", "severity", "top1")
    return Table("", [Column(n, kind=TEXT) for n in names], rows)


def plot(recs: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy vs severity (0 = clean), one line per method, one panel per column; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KdbenchError("--plot needs matplotlib: pip install 'kdbench[plot]'") from None
    fig, axes = plt.subplots(1, len(recs), figsize=(5.0 * len(recs), 4.0), squeeze=False)
    for ax, t in zip(axes[0], recs, strict=True):
        for x in t["rows"]:
            xs = [0] + t["severities"]
            ys = [x["clean"]] + [x["by_severity"][s] for s in t["severities"]]
            ax.plot(xs, ys, marker="o", label=x["method"])
        ax.set_xticks([0] + t["severities"])
        ax.set_xticklabels(["clean"] + [str(s) for s in t["severities"]])
        ax.set_xlabel("severity")
        ax.set_ylabel("top-1 (%), mean over corruptions")
        ax.set_title(t["column"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
