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

from kdbench.errors import KdbenchError
from kdbench.metric_defs import MetricInfo, declared, metric_info, split_metric
from kdbench.reports import OPTIMISTIC, SELECTS, SPREAD_LABEL, ReportArgs, RunData, footer, spread
from kdbench.reports.render import (
    BEST,
    NOT_SIGNIFICANT,
    OTHER_RULE,
    TEXT,
    UNDEFINED,
    BestLegend,
    Cell,
    Column,
    Note,
    Report,
    Statistic,
    Table,
    arrow,
    render_report,
)
from kdbench.reports.stats import ALPHA, PAIRED, Comparison, compare_values, holm

TEACHER_ROW = "teacher"
#: metric prefixes of a post-hoc variant of the trained student, shown as an extra row
#: "<method>+<variant>" (``dfr/worst_group`` -> row "kd+dfr", metric ``worst_group``)
VARIANTS = ("dfr",)


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
    by_name: dict[str, dict[str, dict]] = defaultdict(dict)
    for cfg in configs:
        ds = cfg["dataset"]
        by_name[ds["name"]][json.dumps(ds.get("params") or {}, sort_keys=True, default=str)] = (
            ds.get("params") or {}
        )
    out: dict[str, str] = {}
    for name, variants in by_name.items():
        keys = sorted({k for p in variants.values() for k in p})
        differ = [k for k in keys if len({json.dumps(p.get(k), default=str) for p in variants.values()}) > 1]
        for key, params in variants.items():
            extra = ",".join(f"{k}={params.get(k)}" for k in differ)
            out[f"{name}|{key}"] = f"{name}({extra})" if extra else name
    return out


def _ds_key(cfg: dict) -> str:
    ds = cfg["dataset"]
    return f"{ds['name']}|{json.dumps(ds.get('params') or {}, sort_keys=True, default=str)}"


def column_label(cfg: dict, ds_labels: dict[str, str] | None = None) -> str:
    name = (ds_labels or {}).get(_ds_key(cfg), cfg["dataset"]["name"])
    return f"{name}: {cfg['teacher']['label']}→{cfg['student']['label']}"


def _append_new(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _add_values(stats: dict[str, Stat], metrics: dict[str, Any], seed: Any) -> None:
    for m, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            stats[m].values.append(float(v))
            stats[m].seeds.append(seed)


def _cell_rows(run: RunData, cell: dict, args: ReportArgs, epochs: list[int]) -> dict[str, dict[str, Any]]:
    """Board row -> metrics of one finished cell under ``args.select``: its method's row, and a
    ``<method>+<variant>`` row for each post-hoc variant it recorded (final model only)."""
    sel = run.selected(cell, args)
    metrics = dict(sel.metrics)
    if sel.epoch is not None:
        epochs.append(sel.epoch)
        # whole-cell costs do not depend on the epoch chosen
        for m, v in (cell["metrics"] or {}).items():
            info = metric_info(m)
            if info is not None and info.family == "cost":
                metrics.setdefault(m, v)
    row = cell["config"]["method"]["label"]
    per_row = {row: metrics}
    if args.select == "last":  # variants are fitted on the final model only
        for variant in VARIANTS:
            vm = {k[len(variant) + 1 :]: v for k, v in metrics.items() if k.startswith(variant + "/")}
            if vm:
                per_row[f"{row}+{variant}"] = vm
                metrics = {k: v for k, v in metrics.items() if not k.startswith(variant + "/")}
                per_row[row] = metrics
    return per_row


def _add_teachers(run: RunData, stats: dict, teacher_ids: dict[str, set[str]]) -> None:
    """The teacher row of each column: the stored metrics (and training time) of its teachers."""
    for col, ids in teacher_ids.items():
        for tid in sorted(ids):
            t = run.teachers.get(tid)
            if t and t.get("metrics"):
                for m, v in t["metrics"].items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        stats[TEACHER_ROW][col][m].values.append(float(v))
                if t.get("wall_s") is not None:
                    stats[TEACHER_ROW][col]["wall_s"].values.append(float(t["wall_s"]))


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
        _append_new(columns, col)
        _append_new(rows, cfg["method"]["label"])
        if c["status"] != "done" or not c["metrics"]:
            failures.append(Failure(cfg["method"]["label"], col, c))
            continue
        for r, ms in _cell_rows(run, c, args, epochs).items():
            _append_new(rows, r)
            _add_values(stats[r][col], ms, cfg.get("seed"))
        if cfg.get("uses_teacher"):
            teacher_ids[col].add(cfg["teacher"]["id"])
    _add_teachers(run, stats, teacher_ids)
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


def statistic(s: Stat, kind: str = "std", digits: int = 2, marks: frozenset[str] = frozenset()) -> Statistic:
    """``s`` as a table cell: mean ± ``kind`` spread (n); missing when no seed has a value."""
    if s.n == 0:
        return Statistic(None, digits=digits)
    return Statistic(s.mean, s.spread(kind), s.n, digits, marks)


def _header_metric(metric: str, info: MetricInfo | None, args: ReportArgs) -> str:
    label = f"{info.label} {arrow(info.higher_is_better)}" if info else metric
    if info and split_metric(metric)[0] != "test":
        label = f"{split_metric(metric)[0]} {label}"
    return f"{label}, mean ± {args.spread} (n)"


def _main_cell(board: Board, r: str, c: str, best: str | None, args: ReportArgs) -> Cell:
    """Method ``r`` in column ``c``: its statistic with marks, or why there is none."""
    s = board.stat(r, c, args.metric)
    if not s.n:
        statuses = [f.cell["status"] for f in board.failures if f.row == r and f.column == c]
        if statuses:
            return "failed" if "failed" in statuses else "not run yet"
        return Statistic(None)
    marks = {BEST} if r == best else set()
    cmp = board.comparisons.get(r, {}).get(c)
    if cmp is not None and cmp.significant is False:
        marks.add(NOT_SIGNIFICANT)
    elif cmp is not None and cmp.undefined:
        marks.add(UNDEFINED)
    return statistic(s, args.spread, marks=frozenset(marks))


def _paper_cell(board: Board, r: str, c: str, args: ReportArgs) -> Cell:
    """The published number of ``r`` in ``c`` with its source and ours − paper; ≠ when the
    paper selected by another rule."""
    ref = board.references.get(r, {}).get(c)
    if ref is None:
        return ""
    s = board.stat(r, c, args.metric)
    other = ref.select is not None and ref.select != args.select
    diff = s.mean - ref.value if s.n else None
    return Statistic(
        ref.value, ref=ref.note or None, diff=diff, marks=frozenset({OTHER_RULE} if other else ())
    )


def board_table(board: Board, args: ReportArgs) -> Table:
    """The leaderboard: one line per row; a paper column after each column that has one."""
    best = {c: board.best(c, args.metric) for c in board.columns}
    with_paper = [c for c in board.columns if any(c in refs for refs in board.references.values())]
    head = f"method ({_header_metric(args.metric, metric_info(args.metric), args)})"
    columns = [Column(head, kind=TEXT)]
    for c in board.columns:
        columns += [Column(c)] + ([Column("paper (Δ)")] if c in with_paper else [])
    body: list[list[Cell]] = []
    for r in board.rows:
        line: list[Cell] = [r + (" (baseline)" if r == args.baseline else "")]
        for c in board.columns:
            line.append(_main_cell(board, r, c, best[c], args))
            if c in with_paper:
                line.append(_paper_cell(board, r, c, args))
        body.append(line)
    refs = (TEACHER_ROW, "ce")
    rules = [
        i
        for i, r in enumerate(board.rows[:-1])
        if r in refs and board.rows[i + 1] not in refs  # reference rows apart
    ]
    return Table("", columns, body, rules=rules)


def _notes(board: Board, args: ReportArgs, run: RunData) -> list[Note]:
    """The footer: the protocol, what bold and the marks mean, the papers, failed cells."""
    info = metric_info(args.metric)
    lines: list[Note] = list(footer(run.protocol(args, board.selected_epochs)))
    if args.select != "last" and TEACHER_ROW in board.rows:
        lines.append("the teacher row is its final model")
    if info is not None:
        lines.append(
            BestLegend(
                f"best per column ({'higher' if info.higher_is_better else 'lower'} is better; "
                "the teacher is not ranked)"
            )
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


def board_report(board: Board, run: RunData, args: ReportArgs) -> Report:
    """The board as a report: its table and footer, its records in CSV and JSON."""
    records = to_records(board, run, args)
    return Report(
        [board_table(board, args)],
        _notes(board, args, run),
        banner=OPTIMISTIC if args.select == "best_test" else None,
        latex="float",
        appendix=[details_table(board, args)] if args.details else [],
        records=Table("", [Column(f, kind=TEXT) for f in CSV_FIELDS], csv_rows(records)),
        data=records,
    )


def render_board(board: Board, run: RunData, args: ReportArgs) -> str:
    """The board in ``args.fmt``."""
    return render_report(board_report(board, run, args), args.fmt)


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
            "std": v.spread("std"),
            "spread": v.spread(args.spread),
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


def _csv_common(rec: dict[str, Any]) -> dict[str, Any]:
    """The fields of every CSV line of a record: who, and the protocol."""
    p = rec["protocol"]
    return {
        "method": rec["method"],
        "column": rec["column"],
        "status": rec["status"],
        "select": p["select"],
        "optimistic": p["optimistic"],
        "epochs": p["epochs"],
        "selected_epochs": p.get("selected_epochs"),
        "seeds": p["seeds"],
        "spread_kind": p["spread"],
        "hardware": "; ".join(p["hardware"]),
        "cell": rec.get("cell"),
        "seed": rec.get("seed"),
        "error": rec.get("error"),
    }


def _csv_comparison(rec: dict[str, Any]) -> dict[str, Any]:
    """The baseline test and the paper's number of the table's metric."""
    sig, paper = rec["significance"], rec["paper"]
    out: dict[str, Any] = {"baseline": rec["baseline"]}
    if sig is not None:
        out.update(
            not_significant=None if sig["significant"] is None else not sig["significant"],
            p_value=sig["p"],
            p_adjusted=sig.get("p_adjusted"),
            test=sig["test"],
        )
    if paper is not None:
        out.update(
            paper=paper["value"],
            paper_diff=paper["diff"],
            paper_source=paper["source"],
            paper_select=paper.get("select"),
        )
    return out


def csv_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """One line per (method, column, metric), one per failed or pending cell; protocol in every
    line; values in :data:`CSV_FIELDS` order."""
    out: list[dict[str, Any]] = []
    for rec in records:
        common = _csv_common(rec)
        if rec["status"] != "done":
            out.append({**common, "metric": rec["metric"]})
            continue
        for m, s in rec["metrics"].items():
            row = {**common, "metric": m, "higher_is_better": s["higher_is_better"], "mean": s["mean"]}
            row.update(std=s["std"], spread=s["spread"], n=s["n"], best=s["best"])
            if m == rec["metric"]:
                row.update(_csv_comparison(rec))
            out.append(row)
    return [[r.get(f) for f in CSV_FIELDS] for r in out]


def to_csv(board: Board, run: RunData, args: ReportArgs) -> str:
    """The board's records as CSV."""
    return render_report(board_report(board, run, args), "csv")


def details_table(board: Board, args: ReportArgs) -> Table:
    """Every test-set metric per (method, column), mean ± spread over seeds."""
    present = {m for r in board.stats.values() for c in r.values() for m in c if "/" not in m}
    order = [m for m in declared() if m in present] + sorted(present - set(declared()))
    rows: list[list[Cell]] = []
    for r in board.rows:
        for c in board.columns:
            st = board.stats.get(r, {}).get(c, {})
            if st:
                rows.append([r, c] + [statistic(st[m], args.spread) if m in st else "—" for m in order])
    columns = [Column("method", kind=TEXT), Column("column", kind=TEXT)]
    columns += [Column(m, info.higher_is_better if (info := metric_info(m)) else None) for m in order]
    return Table("", columns, rows)


def build(run: RunData, args: ReportArgs) -> Report:
    """The ``leaderboard`` report kind."""
    check_metric(run, args.metric)
    board = build_board(run, args)
    if not board.columns:
        raise KdbenchError(f"{run.run_dir} holds no cells yet")
    return board_report(board, run, args)
