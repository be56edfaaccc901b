"""The leaderboard: one row per method, one column per (dataset, teacher→student).

A cell is ``mean ± spread (n)`` over seeds under the selection rule (``--select``), the best
method per column is marked following the metric's declared direction, ``--baseline M``
marks methods whose difference from M is not significant over seeds, and a grid's
``reference:`` map adds the published number with the difference. The teacher and the
``ce`` student (trained without a teacher) are reference rows. Every format states the
protocol: the Markdown footer, the LaTeX caption, fields in CSV and JSON.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

from kdbench.errors import KdbenchError
from kdbench.metric_defs import MetricInfo, declared, metric_info, split_metric
from kdbench.reports import OPTIMISTIC, SELECTS, SPREAD_LABEL, ReportArgs, RunData, footer, spread
from kdbench.reports.render import latex_escape, nan_none, write_csv_dicts
from kdbench.reports.stats import ALPHA, PAIRED, Comparison, compare_values, holm

TEACHER_ROW = "teacher"
#: metric prefixes of a post-hoc variant of the trained student, shown as an extra row
#: "<method>+<variant>" (``dfr/worst_group`` -> row "kd+dfr", metric ``worst_group``)
VARIANTS = ("dfr",)
NOT_SIGNIFICANT = "≈"
#: a comparison whose t statistic is undefined (constant non-zero difference over seeds)
UNDEFINED = "†"
#: a published number selected by another rule than the table's --select
OTHER_RULE = "≠"


@dataclass
class Stat:
    """One metric of one (method, column) over seeds."""

    values: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    def spread(self, kind: str = "std") -> float:
        return spread(self.values, kind)

    @property
    def std(self) -> float:
        return self.spread("std")


@dataclass
class Failure:
    row: str
    column: str
    cell: dict


@dataclass
class Reference:
    value: float
    source: str | None
    note: int = 0  # footnote number of the source
    select: str | None = None  # the paper's selection rule (see reports.SELECTS), when given


@dataclass
class Board:
    """The leaderboard as data: stats[row][column][metric]."""

    rows: list[str]
    columns: list[str]
    stats: dict[str, dict[str, dict[str, Stat]]]
    failures: list[Failure] = field(default_factory=list)
    selected_epochs: list[int] = field(default_factory=list)
    comparisons: dict[str, dict[str, Comparison]] = field(default_factory=dict)  # row -> column -> cmp
    references: dict[str, dict[str, Reference]] = field(default_factory=dict)  # row -> column -> ref
    n_comparisons: int = 0  # tested comparisons the Holm–Bonferroni correction runs over

    @property
    def failed(self) -> int:
        return sum(f.cell["status"] == "failed" for f in self.failures)

    @property
    def pending(self) -> int:
        return sum(f.cell["status"] != "failed" for f in self.failures)

    def stat(self, row: str, column: str, metric: str) -> Stat:
        return self.stats.get(row, {}).get(column, {}).get(metric) or Stat()

    def best(self, column: str, metric: str = "top1") -> str | None:
        """The best method (never the teacher) in ``column``; None when the direction is unknown."""
        info = metric_info(metric)
        if info is None:
            return None
        cands = [(r, self.stat(r, column, metric)) for r in self.rows if r != TEACHER_ROW]
        cands = [(r, s.mean) for r, s in cands if s.n]
        if not cands:
            return None
        return (max if info.higher_is_better else min)(cands, key=lambda rv: rv[1])[0]


def dataset_labels(configs: list[dict]) -> dict[str, str]:
    """A label per distinct dataset entry: its name, plus the parameters that tell apart entries
    sharing that name (two ``spurious`` sets of other strengths must not share a column)."""
    import json as _json

    by_name: dict[str, dict[str, dict]] = defaultdict(dict)
    for cfg in configs:
        ds = cfg["dataset"]
        by_name[ds["name"]][_json.dumps(ds.get("params") or {}, sort_keys=True, default=str)] = (
            ds.get("params") or {}
        )
    out: dict[str, str] = {}
    for name, variants in by_name.items():
        keys = sorted({k for p in variants.values() for k in p})
        differ = [k for k in keys if len({_json.dumps(p.get(k), default=str) for p in variants.values()}) > 1]
        for key, params in variants.items():
            extra = ",".join(f"{k}={params.get(k)}" for k in differ)
            out[f"{name}|{key}"] = f"{name}({extra})" if extra else name
    return out


def _ds_key(cfg: dict) -> str:
    import json as _json

    ds = cfg["dataset"]
    return f"{ds['name']}|{_json.dumps(ds.get('params') or {}, sort_keys=True, default=str)}"


def column_label(cfg: dict, ds_labels: dict[str, str] | None = None) -> str:
    name = (ds_labels or {}).get(_ds_key(cfg), cfg["dataset"]["name"])
    return f"{name}: {cfg['teacher']['label']}→{cfg['student']['label']}"


def build_board(run: RunData, args: ReportArgs) -> Board:
    """Aggregate the run's cells under ``args.select`` into a board."""
    stats: dict[str, dict[str, dict[str, Stat]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(Stat)))
    columns: list[str] = []
    rows: list[str] = []
    teacher_ids: dict[str, set[str]] = defaultdict(set)
    failures: list[Failure] = []
    epochs: list[int] = []
    cells = sorted(run.cells, key=lambda c: (c["config"]["dataset"]["name"], c["config"].get("seed", 0)))
    ds_labels = dataset_labels([c["config"] for c in cells])
    for c in cells:
        cfg = c["config"]
        col = column_label(cfg, ds_labels)
        if col not in columns:
            columns.append(col)
        row = cfg["method"]["label"]
        if row not in rows:
            rows.append(row)
        if c["status"] != "done" or not c["metrics"]:
            failures.append(Failure(row, col, c))
            continue
        sel = run.selected(c, args)
        metrics = dict(sel.metrics)
        if sel.epoch is not None:
            epochs.append(sel.epoch)
            # whole-cell costs do not depend on the epoch chosen
            for m, v in (c["metrics"] or {}).items():
                info = metric_info(m)
                if info is not None and info.family == "cost":
                    metrics.setdefault(m, v)
        per_row = {row: metrics}
        if args.select == "last":  # variants are fitted on the final model only
            for variant in VARIANTS:
                vm = {k[len(variant) + 1 :]: v for k, v in metrics.items() if k.startswith(variant + "/")}
                if vm:
                    per_row[f"{row}+{variant}"] = vm
                    metrics = {k: v for k, v in metrics.items() if not k.startswith(variant + "/")}
                    per_row[row] = metrics
        for r, ms in per_row.items():
            if r not in rows:
                rows.append(r)
            for m, v in ms.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    s = stats[r][col][m]
                    s.values.append(float(v))
                    s.seeds.append(cfg.get("seed"))
        if cfg.get("uses_teacher"):
            teacher_ids[col].add(cfg["teacher"]["id"])
    for col, ids in teacher_ids.items():
        for tid in sorted(ids):
            t = run.teachers.get(tid)
            if t and t.get("metrics"):
                for m, v in t["metrics"].items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        stats[TEACHER_ROW][col][m].values.append(float(v))
                if t.get("wall_s") is not None:
                    stats[TEACHER_ROW][col]["wall_s"].values.append(float(t["wall_s"]))
    # reference rows first: teacher, then the teacher-free student, then methods in grid order
    order = (
        ([TEACHER_ROW] if TEACHER_ROW in stats else [])
        + [r for r in rows if r == "ce"]
        + [r for r in rows if r != "ce"]
    )
    board = Board(order, columns, stats, failures, epochs)
    if args.baseline:
        board.comparisons = compare_all(board, args.baseline, args.metric)
        board.n_comparisons = holm([c for per in board.comparisons.values() for c in per.values()])
    board.references = references(run, board, args.metric)
    return board


# ---------------------------------------------------------------- significance


def compare(base: Stat, other: Stat) -> Comparison:
    """``other`` against ``base`` over seeds (:func:`kdbench.reports.stats.compare_values`)."""
    return compare_values(base.values, base.seeds, other.values, other.seeds)


def compare_all(board: Board, baseline: str, metric: str) -> dict[str, dict[str, Comparison]]:
    if baseline not in board.rows or baseline == TEACHER_ROW:
        methods = [r for r in board.rows if r != TEACHER_ROW]
        raise KdbenchError(
            f"--baseline {baseline!r} is not a method of this run; choose one of {', '.join(methods)}"
        )
    out: dict[str, dict[str, Comparison]] = {}
    for r in board.rows:
        if r in (TEACHER_ROW, baseline):
            continue
        for c in board.columns:
            base, other = board.stat(baseline, c, metric), board.stat(r, c, metric)
            if base.n and other.n:
                out.setdefault(r, {})[c] = compare(base, other)
    return out


# ---------------------------------------------------------------- published numbers


def _norm(key: str) -> str:
    return "".join(key.replace("->", "→").split())


#: keys of a method's ``reference:`` entry that apply to all its pairs, not a pair
_REFERENCE_DEFAULTS = ("source", "select")


def _reference_entry(
    where: str, v: Any, defaults: dict[str, Any]
) -> tuple[float, str | None, str, str | None]:
    """(value, source, metric, select) of one published number: a bare number or a mapping
    ``{value, source, metric, select}``; ``select`` is the paper's rule (one of ``--select``'s)."""
    value, source, metric, select = v, defaults.get("source"), "top1", defaults.get("select")
    if isinstance(v, dict):
        value, source = v.get("value"), v.get("source", source)
        metric, select = v.get("metric", "top1"), v.get("select", select)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise KdbenchError(f"{where}: expected a number, got {value!r}")
    if select is not None and select not in SELECTS:
        raise KdbenchError(
            f"{where}: select {select!r} is not a selection rule; use one of {', '.join(SELECTS)} "
            "(best_test for a paper's best epoch on the test set)"
        )
    return float(value), source, metric, select


def references(run: RunData, board: Board, metric: str) -> dict[str, dict[str, Reference]]:
    """Published numbers of the grid's ``reference:`` map that match a (row, column) of ``metric``."""
    raw = run.grid.get("reference") or {}
    where = run.run_dir / "grid.yaml"
    if not isinstance(raw, dict):
        raise KdbenchError(f"{where}: reference: expected a mapping of method -> {{pair: number}}")
    out: dict[str, dict[str, Reference]] = {}
    notes: list[str | None] = []
    for method, entries in raw.items():
        if not isinstance(entries, dict):
            raise KdbenchError(f"{where}: reference.{method}: expected a mapping of pair -> number")
        defaults = {k: entries.get(k) for k in _REFERENCE_DEFAULTS}
        for key, v in entries.items():
            if key in _REFERENCE_DEFAULTS:
                continue
            value, source, ref_metric, select = _reference_entry(
                f"{where}: reference.{method}.{key}", v, defaults
            )
            if ref_metric != metric or method not in board.rows:
                continue
            for col in board.columns:
                if _norm(key) in (_norm(col), _norm(col.split(": ", 1)[-1])):
                    if source not in notes:
                        notes.append(source)
                    note = notes.index(source) + 1 if source else 0
                    out.setdefault(method, {})[col] = Reference(value, source, note, select)
    return out


# ---------------------------------------------------------------- rendering


class UnknownMetric(KdbenchError):
    """``--metric`` names no declared metric, or none a cell of the run recorded."""


def check_metric(run: RunData, metric: str) -> None:
    """Raise (exit 2) when ``metric`` is not declared (:mod:`kdbench.metric_defs`), or no finished
    cell recorded it, naming the metrics that exist. A declared metric of a run with no finished
    cell passes: the table then lists the failures."""
    known = metric_info(metric) is not None
    done = run.done()
    if known and not done:
        return
    have: set[str] = set()
    for c in done:
        have.update(k for k, v in (c["metrics"] or {}).items() if isinstance(v, int | float))
    if metric in have:
        return
    names = sorted({_family_name(k) for k in have})
    hint = "" if known else f" (declared metrics: {', '.join(n for n in declared() if '*' not in n)})"
    has = f"this run has: {', '.join(names)}" if names else "no cell of this run finished"
    raise UnknownMetric(
        f"{'no cell of this run recorded' if known else 'unknown'} metric {metric!r}; {has}{hint}"
    )


def _family_name(name: str) -> str:
    """``c/fog/3/top1`` -> ``c/*/*/top1``, ``group/a/acc`` -> ``group/*/acc`` (short listings)."""
    where, metric = split_metric(name)
    info = metric_info(metric)
    metric = info.name if info else metric
    if where.startswith("c/"):
        where = "c/*/*"
    return metric if where == "test" else f"{where}/{metric}"


def fmt_stat(s: Stat, kind: str = "std", digits: int = 2) -> str:
    """``mean ± spread (n)``; a single seed has no spread."""
    if s.n == 0:
        return "—"
    if s.n == 1:
        return f"{s.mean:.{digits}f} ({s.n})"
    return f"{s.mean:.{digits}f} ± {s.spread(kind):.{digits}f} ({s.n})"


def _signed(v: float) -> str:
    return f"{v:+.2f}".replace("-", "−")


def _header_metric(metric: str, info: MetricInfo | None, args: ReportArgs) -> str:
    label = f"{info.label} {info.arrow}" if info else metric
    if info and split_metric(metric)[0] != "test":
        label = f"{split_metric(metric)[0]} {label}"
    return f"{label}, mean ± {args.spread} (n)"


def _cells(board: Board, args: ReportArgs, bold: str, esc=lambda s: s, approx: str = NOT_SIGNIFICANT):
    """Table body and header: one line per row; paper columns after the columns that have one."""
    metric = args.metric
    best = {c: board.best(c, metric) for c in board.columns}
    with_paper = [c for c in board.columns if any(c in refs for refs in board.references.values())]
    head = []
    for c in board.columns:
        head.append(esc(c))
        if c in with_paper:
            head.append(esc("paper (Δ)"))
    body = []
    for r in board.rows:
        name = r + (" (baseline)" if r == args.baseline else "")
        line = [esc(name)]
        for c in board.columns:
            s = board.stat(r, c, metric)
            text = esc(fmt_stat(s, args.spread))
            if not s.n:
                statuses = [f.cell["status"] for f in board.failures if f.row == r and f.column == c]
                if statuses:
                    text = "failed" if "failed" in statuses else "not run yet"
            if r == best[c] and s.n:
                text = bold.format(text)
            cmp = board.comparisons.get(r, {}).get(c)
            if cmp is not None and cmp.significant is False:
                text += " " + approx
            elif cmp is not None and cmp.undefined:
                text += " " + esc(UNDEFINED)
            line.append(text)
            if c in with_paper:
                ref = board.references.get(r, {}).get(c)
                if ref is None:
                    line.append("")
                else:
                    txt = f"{ref.value:.2f}" + (f" [{ref.note}]" if ref.note else "")
                    if s.n:
                        txt += f" ({_signed(s.mean - ref.value)})"
                    if ref.select is not None and ref.select != args.select:
                        txt += " " + OTHER_RULE
                    line.append(esc(txt))
        body.append(line)
    return head, body


def _notes(board: Board, args: ReportArgs, run: RunData, bold_word: str) -> list[str]:
    info = metric_info(args.metric)
    lines = footer(run.protocol(args, board.selected_epochs))
    if args.select != "last" and TEACHER_ROW in board.rows:
        lines.append("the teacher row is its final model")
    if info is not None:
        lines.append(
            f"{bold_word}: best per column ({'higher' if info.higher_is_better else 'lower'} is better; "
            "the teacher is not ranked)"
        )
    if args.baseline:
        lines += _significance_notes(board, args.baseline)
    sources: dict[int, str] = {}
    for refs in board.references.values():
        for ref in refs.values():
            if ref.note:
                sources[ref.note] = ref.source or ""
    if board.references:
        lines.append(
            "paper: published number (Δ = ours − paper)"
            + ("; " + "; ".join(f"[{k}] {v}" for k, v in sorted(sources.items())) if sources else "")
        )
    rules = sorted(
        {ref.select for refs in board.references.values() for ref in refs.values()} - {None, args.select}
    )
    if rules:
        lines.append(
            f"{OTHER_RULE}: the paper selected its number by {' / '.join(rules)}, "
            f"this table by {args.select}: Δ compares different selection rules"
        )
    if board.failed:
        lines.append(f"{board.failed} cell(s) failed")
    if board.pending:
        lines.append(f"{board.pending} cell(s) not run yet")
    return lines


def _significance_notes(board: Board, baseline: str) -> list[str]:
    """What the ≈ and † marks mean: the tests, the Holm–Bonferroni correction and its size."""
    cmps = [c for per in board.comparisons.values() for c in per.values()]
    tests = sorted({c.test for c in cmps if c.p is not None})
    small = [c for c in cmps if c.p is None and not c.undefined]
    undefined = [c for c in cmps if c.undefined]
    if cmps and len(small) == len(cmps):
        return [f"significance vs {baseline}: n too small (fewer than 3 seeds); nothing marked"]
    lines = []
    if tests:
        lines.append(
            f"{NOT_SIGNIFICANT}: difference from {baseline} not significant "
            f"(p ≥ {ALPHA} after Holm–Bonferroni over the {board.n_comparisons} comparison(s) of this table; "
            f"{' / '.join(tests)} over seeds"
            + ("; paired on the seeds both share" if PAIRED in tests else "")
            + ")"
        )
    if small:
        lines.append(f"{len(small)} comparison(s) not tested: n too small (fewer than 3 seeds)")
    if undefined:
        lines.append(
            f"{UNDEFINED}: the same non-zero difference from {baseline} on every seed (zero variance): "
            f"the t-test is undefined; {len(undefined)} comparison(s) not tested, not marked significant"
        )
    return lines


def render_board(board: Board, run: RunData, args: ReportArgs) -> str:
    """The board in ``args.fmt``."""
    if args.fmt == "json":
        return json.dumps(to_records(board, run, args), indent=2)
    if args.fmt == "csv":
        return to_csv(board, run, args)
    info = metric_info(args.metric)
    if args.fmt == "latex":
        head, body = _cells(board, args, r"\textbf{{{}}}", latex_escape, r"$\approx$")
        ncols = len(head)
        lines = [
            r"\begin{table}",
            r"\centering",
            r"\begin{tabular}{l" + "c" * ncols + "}",
            r"\toprule",
            " & ".join([latex_escape("Method (" + _header_metric(args.metric, info, args) + ")")] + head)
            + r" \\",
            r"\midrule",
        ]
        refs = (TEACHER_ROW, "ce")
        for i, r in enumerate(body):
            lines.append(" & ".join(r) + r" \\")
            if board.rows[i] in refs and i + 1 < len(body) and board.rows[i + 1] not in refs:
                lines.append(r"\midrule")
        caption = ". ".join(latex_escape(x) for x in _notes(board, args, run, "bold")) + "."
        lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + caption + "}", r"\end{table}"]
        return "\n".join(lines)
    head, body = _cells(board, args, "**{}**")
    first = f"method ({_header_metric(args.metric, info, args)})"
    text = tabulate(body, headers=[first] + head, tablefmt="github")
    notes = _notes(board, args, run, "**bold**")
    if args.select == "best_test":
        text = f"**{OPTIMISTIC}**\n\n" + text
    return text + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _protocol_fields(board: Board, run: RunData, args: ReportArgs) -> dict[str, Any]:
    p = run.protocol(args, board.selected_epochs)
    p["spread_kind"] = SPREAD_LABEL[args.spread]
    return p


def to_records(board: Board, run: RunData, args: ReportArgs) -> list[dict[str, Any]]:
    """One record per (method, column) with numbers, and one per failed or pending cell."""
    protocol = _protocol_fields(board, run, args)
    out: list[dict[str, Any]] = []
    for c in board.columns:
        best = {m: board.best(c, m) for r in board.rows for m in board.stats.get(r, {}).get(c, {})}
        for r in board.rows:
            st = board.stats.get(r, {}).get(c, {})
            if st:
                out.append(_record(board, r, c, st, best, args) | {"protocol": protocol})
    for f in board.failures:
        out.append(
            {
                "method": f.row,
                "column": f.column,
                "status": f.cell["status"],
                "cell": f.cell["id"],
                "seed": f.cell["config"].get("seed"),
                "error": f.cell.get("error"),
                "metric": args.metric,
                "metrics": {},
                "protocol": protocol,
            }
        )
    return out


def _record(
    board: Board, r: str, c: str, st: dict[str, Stat], best: dict[str, str | None], args: ReportArgs
) -> dict[str, Any]:
    """The record of method ``r`` in column ``c``: every metric, the test against the baseline
    and the paper's number."""
    cmp = board.comparisons.get(r, {}).get(c)
    ref = board.references.get(r, {}).get(c)
    s = st.get(args.metric, Stat())
    metrics = {}
    for m, v in st.items():
        if not v.n:
            continue
        info = metric_info(m)
        metrics[m] = {
            "mean": v.mean,
            "std": nan_none(v.spread("std")),
            "spread": nan_none(v.spread(args.spread)),
            "n": v.n,
            "values": v.values,
            "seeds": v.seeds,
            "higher_is_better": info.higher_is_better if info else None,
            "best": r == best.get(m),
        }
    significance = None
    if cmp is not None:
        significance = {"test": cmp.test, "p": cmp.p, "diff": cmp.diff, "significant": cmp.significant}
        significance["alpha"] = ALPHA
        if cmp.test != "n too small":
            significance.update(
                p_adjusted=cmp.p_adjusted,
                correction="holm-bonferroni",
                comparisons=board.n_comparisons,
                n=cmp.n,
                undefined=cmp.undefined,
            )
    paper = None
    if ref is not None:
        paper = {"value": ref.value, "source": ref.source, "diff": (s.mean - ref.value) if s.n else None}
        if ref.select is not None:
            paper.update(select=ref.select, same_select=ref.select == args.select)
    return {
        "method": r,
        "column": c,
        "status": "done",
        "metric": args.metric,
        "best": r == best.get(args.metric) and s.n > 0,
        "baseline": args.baseline,
        "is_baseline": r == args.baseline,
        "significance": significance,
        "paper": paper,
        "metrics": metrics,
    }


#: the first seven as before the protocol fields existed, so scripts reading by position still work
CSV_FIELDS = [
    "method",
    "column",
    "metric",
    "mean",
    "std",
    "n",
    "best",
    "status",
    "higher_is_better",
    "spread",
    "baseline",
    "not_significant",
    "p_value",
    "test",
    "paper",
    "paper_diff",
    "paper_source",
    "select",
    "optimistic",
    "epochs",
    "selected_epochs",
    "seeds",
    "spread_kind",
    "hardware",
    "cell",
    "seed",
    "error",
    "p_adjusted",
    "paper_select",
]


def to_csv(board: Board, run: RunData, args: ReportArgs) -> str:
    """One line per (method, column, metric), one per failed or pending cell; protocol in every line."""
    out: list[dict[str, Any]] = []

    def g(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, list):
            return " ".join(map(str, v))
        return str(v)

    for rec in to_records(board, run, args):
        p = rec["protocol"]
        common = {
            "method": rec["method"],
            "column": rec["column"],
            "status": rec["status"],
            "select": p["select"],
            "optimistic": g(p["optimistic"]),
            "epochs": g(p["epochs"]),
            "selected_epochs": g(p.get("selected_epochs")),
            "seeds": g(p["seeds"]),
            "spread_kind": p["spread"],
            "hardware": "; ".join(p["hardware"]),
            "cell": rec.get("cell", ""),
            "seed": g(rec.get("seed")),
            "error": rec.get("error") or "",
        }
        if rec["status"] != "done":
            out.append({**common, "metric": rec["metric"]})
            continue
        for m, s in rec["metrics"].items():
            row = {
                **common,
                "metric": m,
                "higher_is_better": g(s["higher_is_better"]),
                "mean": g(s["mean"]),
                "std": g(s["std"]),
                "spread": g(s["spread"]),
                "n": s["n"],
                "best": g(s["best"]),
            }
            if m == rec["metric"]:
                sig, paper = rec["significance"], rec["paper"]
                row["baseline"] = rec["baseline"] or ""
                if sig is not None:
                    row["not_significant"] = g(None if sig["significant"] is None else not sig["significant"])
                    row["p_value"] = g(sig["p"])
                    row["p_adjusted"] = g(sig.get("p_adjusted"))
                    row["test"] = sig["test"]
                if paper is not None:
                    row.update(
                        paper=g(paper["value"]),
                        paper_diff=g(paper["diff"]),
                        paper_source=paper["source"] or "",
                        paper_select=paper.get("select") or "",
                    )
            out.append(row)
    return write_csv_dicts(CSV_FIELDS, out)


def render_details(board: Board, args: ReportArgs) -> str:
    """Every test-set metric per (method, column), mean ± spread over seeds."""
    present = {m for r in board.stats.values() for c in r.values() for m in c if "/" not in m}
    order = [m for m in declared() if m in present] + sorted(present - set(declared()))
    rows = []
    for r in board.rows:
        for c in board.columns:
            st = board.stats.get(r, {}).get(c, {})
            if st:
                rows.append([r, c] + [fmt_stat(st[m], args.spread) if m in st else "—" for m in order])
    heads = [m + (f" {metric_info(m).arrow}" if metric_info(m) else "") for m in order]
    return tabulate(rows, headers=["method", "column"] + heads, tablefmt="github")


def render(run: RunData, args: ReportArgs) -> str:
    """The ``leaderboard`` report kind."""
    check_metric(run, args.metric)
    board = build_board(run, args)
    if not board.columns:
        raise KdbenchError(f"{run.run_dir} holds no cells yet")
    text = render_board(board, run, args)
    if args.details and args.fmt == "github":
        text += "\n\n" + render_details(board, args)
    return text
