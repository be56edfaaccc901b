"""Turning report tables into text: github / latex tables, CSV, and the shared formatting rules.

A report kind builds :class:`Table` objects (a title, a header, rows of cell texts) plus the
notes of its footer, and :func:`render_tables` lays them out: GitHub Markdown, or LaTeX
booktabs (via tabulate, which escapes the cells) whose titles and notes become ``%`` comments
so the output compiles as is. CSV is written by :func:`write_csv` only (one dialect: ``\\n``
line ends, minimal quoting), and every missing number goes through :func:`is_missing` /
:func:`nan_none`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

TABLE_FORMATS = {"github": "github", "latex": "latex_booktabs"}


@dataclass
class Table:
    """One titled table: ``header`` names the columns, ``rows`` hold the cell texts."""

    title: str
    header: list[str]
    rows: list[list[Any]] = field(default_factory=list)


def is_missing(v: Any) -> bool:
    """None or NaN: a number that is not there (one seed has no spread, a set was not evaluated)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def nan_none(v: Any) -> Any:
    """``v`` with NaN as None (JSON has no NaN)."""
    return None if is_missing(v) else v


def fmt_num(v: Any, digits: int = 1) -> str:
    """``v`` with ``digits`` decimals, or — when missing."""
    return "—" if is_missing(v) else f"{v:.{digits}f}"


def csv_num(v: Any) -> str:
    """A number in CSV: 6 significant digits, empty when missing."""
    return "" if is_missing(v) else f"{v:.6g}"


def write_csv(header: list[str], rows: Iterable[list[Any]]) -> str:
    """The one CSV writer of the reports: a header line, then ``rows``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_csv_dicts(fields: list[str], rows: Iterable[dict[str, Any]]) -> str:
    """:func:`write_csv` for rows given as ``{field: value}`` (absent fields stay empty)."""
    return write_csv(fields, ([r.get(f, "") for f in fields] for r in rows))


def latex_comment(text: str) -> str:
    """Prose as ``%`` comment lines, so LaTeX output compiles as is (an ``&`` or ``%`` in it too)."""
    return "\n".join(f"% {ln}" if ln else ln for ln in text.splitlines())


def latex_escape(s: str) -> str:
    """Text for LaTeX outside tabulate: specials escaped, symbols as math."""
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


def render_tables(tables: list[Table], notes: list[str], fmt: str) -> str:
    """``tables`` (each under its title) and the footer ``notes`` in ``fmt`` (github or latex)."""
    prose = latex_comment if fmt == "latex" else str
    parts = [
        prose(t.title)
        + "\n\n"
        + tabulate(t.rows, headers=t.header, tablefmt=TABLE_FORMATS[fmt], disable_numparse=True)
        for t in tables
    ]
    return "\n\n".join(parts) + "\n\n" + prose(bullets(notes))
