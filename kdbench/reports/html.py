"""The HTML renderer: report tables as one self-contained page, and the whole-run results page.

:func:`render_html` lays out any :class:`~kdbench.reports.render.Report` as a standalone
document (``kdbench report RUN --kind K --format html``). :func:`page` is the results page of
a run (``--format html`` with the default kind): every section the run has data for —

- the leaderboard (the ``--metric`` table with best, significance and paper marks, then every
  test-set metric), under its protocol footer plus the kdbench version and git sha;
- per-group tables with a worst-group vs average chart (teacher first), and the shift report;
- corruption accuracy per corruption and per severity (table and line chart), mCE / rel. mCE;
- learning curves (mean ± one std over seeds; validation dashed where recorded);
- CKA heatmaps (``kdbench cka``) and ConfiG sample grids (``round_NNN.png``) found in the run;
- failed and pending cells with their errors, and what the run cost.

Tables are ``<table>`` elements whose cells hold the same text as the other formats (so a copy
into a spreadsheet works); a statistic carries its exact mean in ``data-value`` for sorting.
The page fetches nothing: CSS and JS are inline, charts inline SVG, pictures ``data:`` URIs,
and a Content-Security-Policy forbids any other source.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdbench import __version__
from kdbench.errors import KdbenchError
from kdbench.metric_defs import split_metric
from kdbench.reports import ReportArgs, RunData, hardware
from kdbench.reports import corruptions as corruptions_kind
from kdbench.reports import groups as groups_kind
from kdbench.reports import html_charts as charts
from kdbench.reports import leaderboard as leaderboard_kind
from kdbench.reports import shift as shift_kind
from kdbench.reports.html_assets import CSP, CSS, JS
from kdbench.reports.render import (
    BEST,
    NOT_SIGNIFICANT,
    NUMBER,
    OTHER_RULE,
    SUFFIX_MARKS,
    TEXT,
    UNDEFINED,
    BestLegend,
    Cell,
    Column,
    Note,
    Report,
    Statistic,
    Table,
    is_missing,
)

#: what a mark means, shown when the reader hovers it
MARK_TITLES = {
    NOT_SIGNIFICANT: "not significantly different from the baseline",
    UNDEFINED: "the test is undefined: the same difference on every seed",
    OTHER_RULE: "the paper selected its number by another rule",
}
#: pictures embedded per kind at most; the rest are listed by path
MAX_IMAGES = 24
#: id of the main leaderboard table (tests and links find it by this)
LEADERBOARD_ID = "leaderboard-table"


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


# ---------------------------------------------------------------- tables


def cell_html(cell: Cell, column: Column) -> str:
    """One ``<td>``: a statistic's text (bold and shaded when best, then its marks) with its
    exact mean in ``data-value``; a number with its value; text as text."""
    if isinstance(cell, Statistic):
        if is_missing(cell.mean):
            return f'<td class="stat missing">{esc(cell.text)}</td>'
        best = BEST in cell.marks
        text = esc(cell.text)
        text = f"<strong>{text}</strong>" if best else text
        text += "".join(
            f' <span class="mark" title="{esc(MARK_TITLES[m])}">{esc(m)}</span>'
            for m in SUFFIX_MARKS
            if m in cell.marks
        )
        cls = "stat best" if best else "stat"
        return f'<td class="{cls}" data-value="{cell.mean!r}">{text}</td>'
    if isinstance(cell, bool) or cell is None:
        return f"<td>{esc('' if cell is None else cell)}</td>"
    if isinstance(cell, int | float):
        value = "" if is_missing(cell) else repr(cell)
        return f'<td class="number" data-value="{value}">{esc(cell)}</td>'
    kind = {TEXT: "text", NUMBER: "number"}.get(column.kind, "stat")
    cls = f"{kind} failed" if cell == "failed" else kind
    return f'<td class="{cls}">{esc(cell)}</td>'


def table_html(t: Table, table_id: str | None = None) -> str:
    """``t`` as a sortable ``<table>`` under its title, its notes after it."""
    out = [f"<h3>{esc(t.title)}</h3>"] if t.title else []
    attr = f' id="{esc(table_id)}"' if table_id else ""
    head = "".join(f'<th scope="col">{esc(c.header)}</th>' for c in t.columns)
    body = []
    for i, row in enumerate(t.rows):
        cls = ' class="rule"' if i in t.rules else ""
        tds = "".join(cell_html(c, col) for c, col in zip(row, t.columns, strict=True))
        body.append(f"<tr{cls}>{tds}</tr>")
    out.append(
        f'<div class="scroll"><table class="sortable"{attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
    if t.notes:
        out.append(_notes_list(t.notes, "notes"))
    return "\n".join(out)


def _notes_list(notes: list[Note] | list[str], cls: str) -> str:
    items = [
        f"<li><strong>bold</strong>: {esc(n.text)}</li>"
        if isinstance(n, BestLegend)
        else f"<li>{esc(n)}</li>"
        for n in notes
    ]
    return f'<ul class="{cls}">' + "".join(items) + "</ul>"


def report_body(report: Report, first_id: str | None = None, extra_notes: list[str] | None = None) -> str:
    """A report's banner, tables, footer notes (plus ``extra_notes``) and appendix tables."""
    parts = [f'<p class="banner">{esc(report.banner)}</p>'] if report.banner else []
    parts += [table_html(t, first_id if i == 0 else None) for i, t in enumerate(report.tables)]
    notes = list(report.notes) + list(extra_notes or [])
    if notes:
        parts.append(_notes_list(notes, "protocol"))
    parts += [table_html(t) for t in report.appendix]
    return "\n".join(parts)


# ---------------------------------------------------------------- the document


@dataclass
class Section:
    """One ``<section>`` of the page: its anchor, heading and HTML."""

    id: str
    title: str
    body: str

    def html(self) -> str:
        return f'<section id="{esc(self.id)}">\n<h2>{esc(self.title)}</h2>\n{self.body}\n</section>'


def document(title: str, subtitle: str, sections: list[Section], intro: str = "") -> str:
    """A standalone page: inline style and script, navigation over the sections."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="color-scheme" content="light dark">',
            f'<meta name="generator" content="kdbench {esc(__version__)}">',
            f"<title>{esc(title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            "<header>",
            f"<h1>{esc(title)}</h1>",
            f'<p class="sub">{esc(subtitle)}</p>',
            f"<nav>{nav}</nav>" if len(sections) > 1 else "",
            "</header>",
            intro,
            *(s.html() for s in sections),
            f"<footer>made by kdbench {esc(__version__)} from the run's results store; "
            "click a column header to sort a table</footer>",
            f"<script>{JS}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


def render_html(report: Report, title: str = "kdbench report", subtitle: str = "") -> str:
    """Any report as a standalone HTML page (the ``html`` format of one report kind)."""
    return document(title, subtitle, [Section("report", title, report_body(report))])


# ---------------------------------------------------------------- the results page


def _kind_args(args: ReportArgs, kind: str, **changes: Any) -> ReportArgs:
    return replace(args, **{"kind": kind, "plot": None, "details": False, **changes})


def _software(cells: list[dict]) -> list[str]:
    """kdbench versions and git commits the finished cells ran with."""
    envs = [c.get("env") or {} for c in cells]
    versions = sorted({str(e["kdbench"]) for e in envs if e.get("kdbench")})
    shas = sorted({str(e["git_sha"])[:12] for e in envs if e.get("git_sha")})
    return [
        f"kdbench: {', '.join(versions) or 'not recorded'}; git: {', '.join(shas) or 'not recorded'}"
        f" (this page: kdbench {__version__})"
    ]


def leaderboard_section(run: RunData, args: ReportArgs) -> Section:
    """The leaderboard and every test-set metric, with the protocol footer."""
    largs = _kind_args(args, "leaderboard", details=True)
    leaderboard_kind.check_metric(run, largs.metric)
    board = leaderboard_kind.build_board(run, largs)
    report = leaderboard_kind.board_report(board, run, largs)
    for t in report.appendix:
        t.title = t.title or "every test-set metric, mean ± spread (n)"
    extra = _software(run.done())
    if not args.baseline:
        extra.append("no significance marks: report with --baseline METHOD to test every method against one")
    body = report_body(report, LEADERBOARD_ID, extra)
    return Section("leaderboard", "Leaderboard", body)


def _chart(svg: str | None, caption: str) -> str:
    if svg is None:
        why = 'chart not drawn (needs matplotlib: pip install "kdbench[plot]")'
        return f'<p class="notes">{esc(caption)}: {esc(why)}</p>'
    return f'<figure class="chart">{svg}<figcaption>{esc(caption)}</figcaption></figure>'


def _draw(fn: Any, *a: Any) -> str | None:
    return fn(*a) if charts.available() else None


def groups_section(run: RunData, args: ReportArgs) -> Section | None:
    """Per-group tables and a worst-group vs average chart per column (teacher first)."""
    gargs = _kind_args(args, "groups", metric="top1")
    try:
        report = groups_kind.build(run, gargs)
    except KdbenchError:
        return None
    board = leaderboard_kind.build_board(run, gargs)
    figures = []
    for rec in groups_kind.tables(board, gargs):
        rows = sorted(rec["rows"], key=lambda r: r[0] != leaderboard_kind.TEACHER_ROW)
        bars = []
        for name, st in rows:
            worst = st["worst_group"]
            avg = st["avg_acc"] if st["avg_acc"].n else board.stat(name, rec["column"], "top1")
            bars.append(
                (
                    name,
                    worst.mean if worst.n else None,
                    worst.spread(args.spread) if worst.n else None,
                    avg.mean if avg.n else None,
                )
            )
        figures.append(
            _chart(
                _draw(charts.worst_vs_average, rec["column"], bars),
                f"{rec['column']}: worst-group vs average accuracy (%) on {rec['set']}, "
                f"error bars ± {args.spread} over seeds",
            )
        )
    return Section("groups", "Groups", report_body(report) + "\n" + "\n".join(figures))


def shift_section(run: RunData, args: ReportArgs) -> Section | None:
    try:
        report = shift_kind.build(run, _kind_args(args, "shift", metric="top1"))
    except KdbenchError:
        return None
    return Section("shift", "Shift: where the errors come from", report_body(report))


def _severity_table(rec: dict[str, Any]) -> Table:
    sevs = rec["severities"]
    columns = [Column("method", kind=TEXT), Column("clean", True)]
    columns += [Column(f"severity {s}", True) for s in sevs]
    rows: list[list[Cell]] = [
        [x["method"], Statistic(x["clean"], digits=1)]
        + [Statistic(x["by_severity"][s], digits=1) for s in sevs]
        for x in rec["rows"]
    ]
    return Table(f"{rec['column']} — top-1 (%) per severity, mean over corruptions", columns, rows)


def corruptions_section(run: RunData, args: ReportArgs) -> Section | None:
    """Per-corruption table with mCE, per-severity table and line chart per column."""
    cargs = _kind_args(args, "corruptions", metric="top1")
    try:
        report = corruptions_kind.build(run, cargs)
    except KdbenchError:
        if not cargs.baseline:
            return None
        cargs = replace(cargs, baseline=None)  # the leaderboard's baseline is no row here
        try:
            report = corruptions_kind.build(run, cargs)
        except KdbenchError:
            return None
    board = leaderboard_kind.build_board(run, cargs)
    baseline = cargs.baseline or "ce"
    parts = [report_body(report)]
    for col in board.columns:
        rec = corruptions_kind.table(board, col, baseline)
        if rec is None:
            continue
        parts.append(table_html(_severity_table(rec)))
        parts.append(
            _chart(
                _draw(charts.severity_lines, col, rec["severities"], rec["rows"]),
                f"{col}: top-1 (%) vs corruption severity (mean over corruptions; clean at 0)",
            )
        )
    return Section("corruptions", "Corruptions", "\n".join(parts))


def curve_series(run: RunData, metric: str) -> dict[str, dict[str, dict[str, list[list[float]]]]]:
    """column -> method -> set ("test", "val") -> one list of per-epoch values per seed."""
    labels = leaderboard_kind.dataset_labels([c["config"] for c in run.cells])
    out: dict[str, dict[str, dict[str, list[list[float]]]]] = defaultdict(lambda: defaultdict(dict))
    for cell in run.done():
        rows = sorted(run.epochs(cell["id"]), key=lambda r: r.get("epoch", 0))
        col = leaderboard_kind.column_label(cell["config"], labels)
        method = cell["config"]["method"]["label"]
        for split in ("test", "val"):
            ys = [
                float(r[f"{split}/{metric}"])
                for r in rows
                if isinstance(r.get(f"{split}/{metric}"), int | float)
            ]
            if ys:
                out[col][method].setdefault(split, []).append(ys)
    return out


def curves_section(run: RunData, args: ReportArgs) -> Section | None:
    """Per column: the per-epoch metric, mean ± std over seeds, test solid and val dashed."""
    metric = split_metric(args.metric)[1]
    series = curve_series(run, metric)
    if not series and metric != "top1":
        metric, series = "top1", curve_series(run, "top1")
    if not series:
        return None
    figures = [
        _chart(
            _draw(charts.learning_curves, col, metric, methods),
            f"{col}: {metric} per epoch, mean over seeds with a ± 1 std band (test solid, validation dashed)",
        )
        for col, methods in series.items()
    ]
    return Section("curves", "Learning curves", '<div class="gallery">' + "\n".join(figures) + "</div>")


def _image(path: Path, caption: str, cls: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    klass = f"image {cls}".strip()
    return (
        f'<figure class="{klass}"><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _gallery(items: list[tuple[Path, str]], run_dir: Path, cls: str = "") -> str:
    shown = [_image(p, c, cls) for p, c in items[:MAX_IMAGES]]
    rest = items[MAX_IMAGES:]
    more = (
        f'<p class="notes">{len(rest)} more not embedded: '
        + ", ".join(esc(p.relative_to(run_dir)) for p, _ in rest)
        + "</p>"
        if rest
        else ""
    )
    return '<div class="gallery">' + "".join(shown) + "</div>" + more


def cka_section(run: RunData) -> Section | None:
    """The heatmaps ``kdbench cka`` wrote into the run's ``analysis/``."""
    pngs = sorted((run.run_dir / "analysis").glob("cka_pair*.png"))
    if not pngs:
        return None
    items = [(p, f"{p.name} (kdbench cka): linear CKA between the pair's layers") for p in pngs]
    return Section("cka", "CKA heatmaps", _gallery(items, run.run_dir))


def _config_rows(cell_dir: Path) -> dict[int, dict]:
    """Round -> its ``{"stage": "config"}`` row of the cell's metrics.jsonl."""
    out: dict[int, dict] = {}
    try:
        lines = (cell_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("stage") == "config" and "round" in row:
            out[int(row["round"])] = row
    return out


def _config_caption(cell: dict, rnd: int, row: dict | None) -> str:
    cfg = cell["config"]
    text = f"{cfg['method']['label']}, seed {cfg.get('seed')}, round {rnd}"
    if row:

        def g(k: str) -> str:
            v = row.get(f"config/{k}")
            return f"{v:.2f}" if isinstance(v, int | float) else "?"

        n = row.get("config/n")
        count = int(n) if isinstance(n, int | float) else "?"
        text += (
            f" (epoch {int(row.get('epoch', 0)) + 1}): {count} samples; teacher confidence "
            f"t {g('t_source')} → {g('t_after')}, student f {g('f_source')} → {g('f_after')}"
        )
    return text + "; each pair: source | generated"


def config_section(run: RunData) -> Section | None:
    """ConfiG's sample grids (``cells/<id>/config/round_NNN.png``) with their t/f captions."""
    items: list[tuple[Path, str]] = []
    for cell in run.cells:
        cdir = run.run_dir / "cells" / cell["id"]
        pngs = sorted((cdir / "config").glob("round_*.png"))
        if not pngs:
            continue
        rows = _config_rows(cdir)
        for p in pngs:
            rnd = int(p.stem.split("_")[-1])
            items.append((p, _config_caption(cell, rnd, rows.get(rnd))))
    if not items:
        return None
    return Section("config", "ConfiG samples", _gallery(items, run.run_dir, "samples"))


def unfinished_section(run: RunData) -> Section | None:
    """Every cell that did not finish, with its error (the last line, and all of it folded)."""
    left = [c for c in run.cells if c["status"] != "done" or not c["metrics"]]
    if not left:
        return None
    labels = leaderboard_kind.dataset_labels([c["config"] for c in run.cells])
    columns = [Column(n, kind=TEXT) for n in ("cell", "method", "column", "seed", "status")]
    columns += [Column("attempts", kind=NUMBER), Column("error", kind=TEXT)]
    rows: list[list[Cell]] = []
    for c in left:
        err = (c.get("error") or "").strip()
        last = err.splitlines()[-1] if err else ""
        cfg = c["config"]
        col = leaderboard_kind.column_label(cfg, labels)
        rows.append(
            [c["id"], cfg["method"]["label"], col, str(cfg.get("seed")), c["status"], c.get("attempts"), last]
        )
    failed = sum(c["status"] == "failed" for c in left)
    table = Table(
        "", columns, rows, notes=[f"{failed} failed, {len(left) - failed} not finished (pending or running)"]
    )
    details = [
        f"<details><summary>{esc(c['id'])} ({esc(c['config']['method']['label'])}, seed "
        f"{esc(c['config'].get('seed'))}): full error</summary><pre>{esc(c['error'])}</pre></details>"
        for c in left
        if c.get("error")
    ]
    return Section("unfinished", "Failed and pending cells", table_html(table) + "\n" + "\n".join(details))


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def facts(run: RunData) -> list[tuple[str, str]]:
    """What the run is and what it cost: cells per state, compute time, teacher forwards saved."""
    states: dict[str, int] = defaultdict(int)
    for c in run.cells:
        states["done" if c["status"] == "done" and c["metrics"] else c["status"]] += 1
    out = [
        ("run", str(run.run_dir)),
        ("cells", ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + f" (of {len(run.cells)})"),
    ]
    last = run.last_run
    if isinstance(last.get("wall_s"), int | float):
        ran = ", ".join(f"{last[k]} {k}" for k in ("done", "failed", "skipped") if last.get(k))
        when = f", finished {last['finished']}" if last.get("finished") else ""
        out.append(
            ("wall time", f"{_seconds(float(last['wall_s']))} for the last kdbench run ({ran}{when})")
        )
    walls = [float(c["wall_s"]) for c in run.cells if isinstance(c.get("wall_s"), int | float)]
    if walls:
        out.append(
            (
                "cell time",
                f"{_seconds(sum(walls))} summed over {len(walls)} cells (longest {_seconds(max(walls))})",
            )
        )
    teach = [float(t["wall_s"]) for t in run.teachers.values() if isinstance(t.get("wall_s"), int | float)]
    if teach:
        out.append(("teacher training", f"{_seconds(sum(teach))} for {len(teach)} teacher(s)"))
    reused = computed = 0
    for c in run.cells:
        shared = (c.get("env") or {}).get("teacher_forwards") or {}
        reused += int(shared.get("reused", 0))
        computed += int(shared.get("computed", 0))
    if reused:
        total = reused + computed
        out.append(
            (
                "teacher forwards saved",
                f"{reused} of {total} ({100 * reused / total:.0f}%) by cells sharing a teacher",
            )
        )
    hw = hardware([c.get("env") or {} for c in run.done()])
    if hw:
        out.append(("hardware", "; ".join(hw)))
    return out


def _facts_html(items: list[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def render_kind(kind: str, build: Any, run: RunData, args: ReportArgs) -> str:
    """The ``html`` format of a report kind: the whole results page for the leaderboard (the
    default kind), else that kind's tables (``build(run, args)``) as a page."""
    if kind == "leaderboard":
        return page(run, args)
    return render_html(build(run, args))


def page(run: RunData, args: ReportArgs) -> str:
    """The results page of ``run``: each section present only when the run has its data."""
    sections = [leaderboard_section(run, args)]
    for build in (groups_section, shift_section, corruptions_section, curves_section):
        s = build(run, args)
        if s is not None:
            sections.append(s)
    for build_run in (cka_section, config_section, unfinished_section):
        s = build_run(run)
        if s is not None:
            sections.append(s)
    title = str(run.grid.get("name") or run.run_dir.name)
    subtitle = f"kdbench results: {', '.join(s.title for s in sections)}"
    return document(title, subtitle, sections, _facts_html(facts(run)))
