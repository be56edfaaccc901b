"""Report tables as data, and the one renderer that turns them into github / latex / csv / json.

A report kind builds a :class:`Report`: :class:`Table` objects (a title, typed :class:`Column`
headers, rows whose cells are :class:`Statistic` values or plain labels) plus the footer notes
stated once under all of them. :func:`render_report` lays it out, and it alone decides how a
number looks: missing values (None or NaN), decimals, ``± spread``, ``(n)``, bold for the best,
the marks (≈ not significant, † undefined, ≠ another selection rule), ↑/↓ in headers, LaTeX
escaping and the footer. GitHub Markdown and LaTeX booktabs tables go through tabulate; LaTeX
titles and notes become ``%`` comments so the output compiles as is (or, for a ``float``
report, the notes become the caption). CSV is written by :func:`write_csv` only (``\\n`` line
ends, minimal quoting); JSON never holds NaN; HTML is :mod:`kdbench.reports.html`. A new
format is one more ``_render_<fmt>``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

TABLE_FORMATS = {"github": "github", "latex": "latex_booktabs"}

#: marks a statistic can carry; all but BEST are appended after the number in this order
BEST = "best"
NOT_SIGNIFICANT = "≈"
UNDEFINED = "†"
OTHER_RULE = "≠"
SUFFIX_MARKS = (NOT_SIGNIFICANT, UNDEFINED, OTHER_RULE)

#: column kinds: labels, statistics (shown as formatted text) and numbers that tabulate
#: aligns as numbers (counts, seeds)
TEXT, STAT, NUMBER = "text", "stat", "number"


@dataclass(frozen=True)
class Column:
    """A column: its name, which direction is better (None: no arrow) and its kind."""

    name: str
    higher_is_better: bool | None = None
    kind: str = STAT

    @property
    def header(self) -> str:
        return self.name + ("" if self.higher_is_better is None else " " + arrow(self.higher_is_better))


@dataclass(frozen=True)
class Statistic:
    """A number of a table: ``mean ± spread (n) [ref] (diff)`` plus marks; missing when
    ``mean`` is None or NaN (shown as ``missing``)."""

    mean: float | None
    spread: float | None = None
    n: int | None = None
    digits: int = 2
    marks: frozenset[str] = frozenset()
    ref: int | None = None  # footnote number of a source, shown as [ref]
    diff: float | None = None  # a signed difference, shown as (+0.80)
    missing: str = "—"

    @property
    def text(self) -> str:
        """The number without its marks, the same in every format before escaping."""
        if is_missing(self.mean):
            return self.missing
        d = self.digits
        out = f"{self.mean:.{d}f}"
        if not is_missing(self.spread):
            out += f" ± {self.spread:.{d}f}"
        if self.n is not None:
            out += f" ({self.n})"
        if self.ref:
            out += f" [{self.ref}]"
        if not is_missing(self.diff):
            out += f" ({signed(self.diff)})"
        return out


Cell = Statistic | str | int | float | None


@dataclass
class Table:
    """One titled table (an empty title shows none); ``notes`` are lines printed right under it."""

    title: str
    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: indices of rows after which a rule is drawn (LaTeX floats: reference rows apart)
    rules: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class BestLegend:
    """The footer line that says what bold means, worded per format."""

    text: str


Note = str | BestLegend


@dataclass
class Report:
    """What a report kind returns: tables, the footer notes, and how CSV / JSON lay them out."""

    tables: list[Table]
    notes: list[Note] = field(default_factory=list)
    #: a warning over the Markdown table (the optimistic selection rule)
    banner: str | None = None
    #: ``tabular``: titled booktabs tables with ``%`` notes; ``float``: one table environment
    #: whose caption is the notes
    latex: str = "tabular"
    #: tables printed after the footer in Markdown (a kind's details)
    appendix: list[Table] = field(default_factory=list)
    #: the CSV layout (one line per number) when it is not the tables themselves
    records: Table | None = None
    #: the JSON document when it is not the tables themselves
    data: Any = None


def arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


def is_missing(v: Any) -> bool:
    """None or NaN: a number that is not there (one seed has no spread, a set was not evaluated)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def nan_none(v: Any) -> Any:
    """``v`` with NaN as None (JSON has no NaN)."""
    return None if is_missing(v) else v


def signed(v: float) -> str:
    """``+0.80`` / ``−5.95`` (a typographic minus)."""
    return f"{v:+.2f}".replace("-", "−")


def csv_value(v: Any) -> str:
    """A value in CSV: numbers with 6 significant digits, booleans 0/1, lists space-separated,
    empty when missing."""
    if isinstance(v, Statistic):
        v = v.mean
    if is_missing(v):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list | tuple):
        return " ".join(map(str, v))
    return str(v)


def write_csv(header: list[str], rows: Iterable[list[Any]]) -> str:
    """The one CSV writer of the reports: a header line, then ``rows`` (see :func:`csv_value`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([csv_value(v) for v in row] for row in rows)
    return buf.getvalue()


def latex_comment(text: str) -> str:
    """Prose as ``%`` comment lines, so LaTeX output compiles as is (an ``&`` or ``%`` in it too)."""
    return "\n".join(f"% {ln}" if ln else ln for ln in text.splitlines())


def latex_escape(s: str) -> str:
    """Text for LaTeX: specials escaped, symbols as math."""
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("→", r"$\rightarrow$"),
        ("±", r"$\pm$"),
        ("≈", r"$\approx$"),
        ("†", r"$\dagger$"),
        ("≠", r"$\neq$"),
        ("↑", r"$\uparrow$"),
        ("↓", r"$\downarrow$"),
        ("≥", r"$\geq$"),
        ("−", r"$-$"),
        ("Δ", r"$\Delta$"),
        ("–", "--"),
    ):
        s = s.replace(a, b)
    return s


def bullets(notes: list[str]) -> str:
    return "\n".join(f"- {n}" for n in notes)


# ---------------------------------------------------------------- one format each


@dataclass(frozen=True)
class _Style:
    """What differs between the text formats: escaping, bold and the word for bold."""

    escape: Any
    bold: str
    bold_word: str


_STYLES = {
    "github": _Style(str, "**{}**", "**bold**"),
    "latex": _Style(latex_escape, r"\textbf{{{}}}", "bold"),
}
#: LaTeX cells handed to tabulate, which escapes them itself (and would escape a \textbf)
_TABULATED = {"github": _STYLES["github"], "latex": _Style(str, "{}", "bold")}


def cell_text(cell: Cell, style: _Style) -> str:
    """One cell in a text format: a statistic formatted, bold when best, then its marks."""
    if not isinstance(cell, Statistic):
        return style.escape("" if cell is None else str(cell))
    text = style.escape(cell.text)
    if BEST in cell.marks and not is_missing(cell.mean):
        text = style.bold.format(text)
    return text + "".join(" " + style.escape(m) for m in SUFFIX_MARKS if m in cell.marks)


def note_texts(notes: list[Note], style: _Style) -> list[str]:
    return [f"{style.bold_word}: {n.text}" if isinstance(n, BestLegend) else n for n in notes]


def _tabulate(t: Table, fmt: str) -> str:
    """``t`` through tabulate; only NUMBER columns are parsed (and aligned) as numbers."""
    style = _TABULATED[fmt]
    rows = [[cell_text(c, style) for c in row] for row in t.rows]
    text_cols = [i for i, c in enumerate(t.columns) if c.kind != NUMBER]
    return tabulate(
        rows,
        headers=[c.header for c in t.columns],
        tablefmt=TABLE_FORMATS[fmt],
        disable_numparse=text_cols if len(text_cols) < len(t.columns) else True,
    )


def _table_block(t: Table, fmt: str) -> str:
    prose = latex_comment if fmt == "latex" else str
    text = (prose(t.title) + "\n\n" if t.title else "") + _tabulate(t, fmt)
    return text + ("\n\n" + prose("\n".join(t.notes)) if t.notes else "")


def _render_text(report: Report, fmt: str) -> str:
    """github, or latex ``tabular``: tables under their titles, then the footer once."""
    parts = [_table_block(t, fmt) for t in report.tables]
    if report.banner and fmt == "github":
        parts.insert(0, f"**{report.banner}**")
    text = "\n\n".join(parts)
    notes = note_texts(report.notes, _STYLES[fmt])
    if notes:
        text += "\n\n" + (latex_comment if fmt == "latex" else str)(bullets(notes))
    if fmt == "github":
        text += "".join("\n\n" + _table_block(t, fmt) for t in report.appendix)
    return text


def _render_latex_float(report: Report) -> str:
    """One ``table`` environment: booktabs rules by hand, the notes as its caption (the first
    header capitalised, as a caption's table reads)."""
    style = _STYLES["latex"]
    (t,) = report.tables
    head = [c.header for c in t.columns]
    head[0] = head[0][:1].upper() + head[0][1:]
    lines = [
        r"\begin{table}",
        r"\centering",
        r"\begin{tabular}{l" + "c" * (len(t.columns) - 1) + "}",
        r"\toprule",
        " & ".join(map(latex_escape, head)) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(t.rows):
        lines.append(" & ".join(cell_text(c, style) for c in row) + r" \\")
        if i in t.rules:
            lines.append(r"\midrule")
    caption = ". ".join(latex_escape(x) for x in note_texts(report.notes, style)) + "."
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + caption + "}", r"\end{table}"]
    return "\n".join(lines)


def _render_csv(report: Report) -> str:
    """The report's records, or its tables' rows under their one header."""
    tables = [report.records] if report.records is not None else report.tables
    headers = {tuple(c.name for c in t.columns) for t in tables}
    if len(headers) > 1:  # a kind's mistake, not the user's: it must say how its tables flatten
        raise ValueError("tables with different columns need Report.records for CSV")
    header = list(headers.pop()) if headers else []
    return write_csv(header, [row for t in tables for row in t.rows])


def jsonable(v: Any) -> Any:
    """``v`` for JSON: NaN as null, statistics as their fields, recursively."""
    if isinstance(v, Statistic):
        d = {k: x for k, x in asdict(v).items() if k not in ("digits", "missing")}
        d["marks"] = sorted(v.marks)
        return jsonable(d)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return nan_none(v)


def _tables_doc(report: Report) -> list[dict[str, Any]]:
    """The tables as JSON records (a kind that lays out no JSON of its own)."""
    return [
        {
            "title": t.title,
            "columns": [asdict(c) for c in t.columns],
            "rows": [{c.name: v for c, v in zip(t.columns, row, strict=True)} for row in t.rows],
            "notes": t.notes,
        }
        for t in report.tables
    ]


def _render_json(report: Report) -> str:
    return json.dumps(jsonable(report.data if report.data is not None else _tables_doc(report)), indent=2)


def render_report(report: Report, fmt: str) -> str:
    """``report`` in ``fmt``: github, latex, csv or json (html pages: kdbench/reports/html.py)."""
    if fmt == "json":
        return _render_json(report)
    if fmt == "csv":
        return _render_csv(report)
    if fmt == "latex" and report.latex == "float":
        return _render_latex_float(report)
    return _render_text(report, fmt)
