"""``kdbench report RUN --kind groups``: per-group accuracy, one table per (dataset, pair).

Rows are methods (teacher first, then ``ce``, the methods, and ``<method>+dfr`` rows when the
grid asked for DFR), columns the groups with their sizes, then worst-group, mean-group and
average accuracy; each cell is ``mean ± spread`` over seeds. The evaluated set is the one
``--metric`` names (``--metric test_reversed/worst_group`` shows ``test_reversed``; default
``test``). ``--plot out.png`` draws the same numbers as bars per method with error bars.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.metric_defs import split_metric
from kdbench.reports import ReportArgs, RunData, footer
from kdbench.reports.leaderboard import Board, Stat, build_board
from kdbench.reports.render import TEXT, Cell, Column, Report, Statistic, Table

SUMMARY = ("worst_group", "mean_group", "avg_acc", "adj_avg_acc")
_GROUP = re.compile(r"^group/(?P<name>[^/]+)/acc$")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders "2_red" before "10_red"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def eval_set(args: ReportArgs) -> str:
    """The evaluated set the report shows: the set prefix of ``--metric`` (default test)."""
    if args.metric in ("top1", ""):
        return "test"
    return split_metric(args.metric)[0]


def _key(prefix: str, metric: str) -> str:
    return metric if prefix == "test" else f"{prefix}/{metric}"


def group_names(board: Board, column: str, prefix: str) -> list[str]:
    """Groups with an accuracy in ``column`` for the set ``prefix``, in natural order."""
    names: set[str] = set()
    for r in board.rows:
        for m in board.stats.get(r, {}).get(column, {}):
            tail = m if prefix == "test" else (m[len(prefix) + 1 :] if m.startswith(prefix + "/") else None)
            hit = _GROUP.match(tail) if tail else None
            if hit:
                names.add(hit["name"])
    return sorted(names, key=natural_key)


def group_sizes(board: Board, column: str, prefix: str, names: list[str]) -> dict[str, int]:
    out = {}
    for g in names:
        for r in board.rows:
            s = board.stat(r, column, _key(prefix, f"group/{g}/n"))
            if s.n:
                out[g] = int(round(s.values[-1]))
                break
    return out


def tables(board: Board, args: ReportArgs) -> list[dict[str, Any]]:
    """One record per column: its groups, sizes and per-row statistics."""
    prefix = eval_set(args)
    out = []
    for col in board.columns:
        names = group_names(board, col, prefix)
        if not names:
            continue
        rows = []
        for r in board.rows:
            stats = {g: board.stat(r, col, _key(prefix, f"group/{g}/acc")) for g in names}
            stats.update({m: board.stat(r, col, _key(prefix, m)) for m in SUMMARY})
            if any(s.n for s in stats.values()):
                rows.append((r, stats))
        out.append(
            {
                "column": col,
                "set": prefix,
                "groups": names,
                "sizes": group_sizes(board, col, prefix, names),
                "rows": rows,
            }
        )
    return out


def build(run: RunData, args: ReportArgs) -> Report:
    """The ``groups`` report kind."""
    board = build_board(run, args)
    recs = tables(board, args)
    if not recs:
        raise KdbenchError(
            f"no per-group metrics for set {eval_set(args)!r} in {run.run_dir}: the grid's datasets have no "
            "groups (use spurious, waterbirds, celeba or spuco_birds), or --metric names a set that was "
            "not evaluated"
        )
    if args.plot:
        plot(recs, Path(args.plot), args.spread)
    notes = footer(run.protocol(args)) + [
        "worst/mean: over non-empty groups (WILDS); adj avg: groups weighted by their share of the training "
        "split (group_DRO's adj_acc_avg)"
    ]
    if args.plot:
        notes.append(f"plot: {args.plot}")
    return Report(
        [_table(t, args.spread) for t in recs],
        list(notes),
        records=_records(recs, args.spread),
        data=[_json(t, args.spread) for t in recs],
    )


def _stat(s: Stat, spread: str) -> Statistic:
    """Mean ± spread with one decimal (one seed: the mean alone)."""
    return Statistic(s.mean if s.n else None, s.spread(spread) if s.n else None, digits=1)


def _table(t: dict[str, Any], spread: str) -> Table:
    head = [Column("method", kind=TEXT)] + [Column(f"{g} (n={t['sizes'].get(g, '?')})") for g in t["groups"]]
    head += [Column(h) for h in ("worst", "mean", "avg", "adj avg")]
    body = [[r] + [_stat(st[k], spread) for k in t["groups"] + list(SUMMARY)] for r, st in t["rows"]]
    return Table(f"{t['column']} — per-group accuracy (%) on {t['set']}", head, body)


def _json(t: dict[str, Any], spread: str) -> dict[str, Any]:
    rows = [
        {
            "method": r,
            "metrics": {
                k: {"mean": s.mean, "spread": s.spread(spread), "n": s.n} for k, s in st.items() if s.n
            },
        }
        for r, st in t["rows"]
    ]
    return {"column": t["column"], "set": t["set"], "sizes": t["sizes"], "rows": rows}


def _records(recs: list[dict[str, Any]], spread: str) -> Table:
    rows: list[list[Cell]] = [
        [t["column"], t["set"], r, k, t["sizes"].get(k), s.mean, s.spread(spread), s.n]
        for t in recs
        for r, st in t["rows"]
        for k, s in st.items()
        if s.n
    ]
    names = ["column", "set", "method", "group", "n_group", "mean", spread, "n"]
    return Table("", [Column(n, kind=TEXT) for n in names], rows)


def plot(recs: list[dict[str, Any]], path: Path, spread: str = "std") -> Path:
    """Grouped bars (groups on x, one bar per method) with error bars over seeds; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KdbenchError("--plot needs matplotlib: pip install 'kdbench[plot]'") from None
    colours = plt.get_cmap("tab20")  # distinct colours for up to 20 rows
    widest = max(len(t["groups"]) * max(len(t["rows"]), 1) for t in recs)
    fig, axes = plt.subplots(len(recs), 1, figsize=(min(30.0, max(6.0, 0.18 * widest + 2)), 4.0 * len(recs)))
    axes = [axes] if len(recs) == 1 else list(axes)
    for ax, t in zip(axes, recs, strict=True):
        groups, rows = t["groups"], t["rows"]
        width = 0.8 / max(len(rows), 1)
        for i, (r, st) in enumerate(rows):
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(groups))]
            means = [st[g].mean if st[g].n else 0.0 for g in groups]
            errs = [
                0.0 if not st[g].n or st[g].spread(spread) != st[g].spread(spread) else st[g].spread(spread)
                for g in groups
            ]
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=r, color=colours(i % 20))
        ax.set_xticks(range(len(groups)))
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_xticklabels(
            [f"{g}\n(n={t['sizes'].get(g, '?')})" for g in groups],
            fontsize=7,
            rotation=45 if len(groups) > 8 else 0,
        )
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{t['column']} ({t['set']})", fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(rows), 7), loc="lower center", bbox_to_anchor=(0.5, 1.06))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
