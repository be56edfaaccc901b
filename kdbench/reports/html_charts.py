"""The charts of the HTML report, drawn with matplotlib as inline SVG (text stays text).

Each function takes the numbers a report kind already computed and returns one ``<svg>``
element, or None when matplotlib is not installed (the page then says so and keeps its
tables). Backgrounds are transparent so the page's colour scheme shows through.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def available() -> bool:
    """Whether matplotlib can be imported (the ``plot`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _figure(width: float, height: float) -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height))
    try:
        yield fig
    finally:
        plt.close(fig)


def to_svg(fig: Any, label: str) -> str:
    """``fig`` as an inline ``<svg>`` (no XML prologue, ids unique in the page, no date)."""
    import matplotlib

    # each chart salts its ids with its label (unique in a page): two inline SVGs must not
    # define the same clip path id, and the same run must give the same page
    rc = {"svg.fonttype": "none", "svg.hashsalt": label}
    buf = io.StringIO()
    with matplotlib.rc_context(rc):
        fig.savefig(buf, format="svg", transparent=True, bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r"^<svg ", f'<svg role="img" aria-label="{_attr(label)}" ', text, count=1)


def _attr(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _ok(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def worst_vs_average(column: str, rows: list[tuple[str, float | None, float | None, float | None]]) -> str:
    """Bars of worst-group and average accuracy per row (``(label, worst, worst spread, avg)``),
    in the given order (teacher first)."""
    with _figure(max(5.0, 0.9 * len(rows) + 2.0), 3.4) as fig:
        ax = fig.add_subplot()
        xs = list(range(len(rows)))
        worst = [w if _ok(w) else 0.0 for _, w, _, _ in rows]
        errs = [s if _ok(s) else 0.0 for _, _, s, _ in rows]
        avg = [a if _ok(a) else 0.0 for _, _, _, a in rows]
        ax.bar([x - 0.2 for x in xs], avg, 0.4, label="average", color="#7aa6d6")
        ax.bar([x + 0.2 for x in xs], worst, 0.4, yerr=errs, capsize=3, label="worst group", color="#d9694a")
        ax.set_xticks(xs, [r[0] for r in rows], rotation=20 if len(rows) > 5 else 0)
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(column, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        return to_svg(fig, f"worst-group vs average accuracy, {column}")


def severity_lines(column: str, severities: list[int], rows: list[dict[str, Any]]) -> str:
    """Top-1 vs severity (0 = clean), mean over corruptions, one line per row."""
    with _figure(5.6, 3.6) as fig:
        ax = fig.add_subplot()
        xs = [0, *severities]
        for x in rows:
            ys = [x["clean"]] + [x["by_severity"][s] for s in severities]
            ax.plot(xs, [y if _ok(y) else math.nan for y in ys], marker="o", label=x["method"])
        ax.set_xticks(xs, ["clean"] + [str(s) for s in severities])
        ax.set_xlabel("severity")
        ax.set_ylabel("top-1 (%), mean over corruptions")
        ax.set_title(column, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return to_svg(fig, f"top-1 per corruption severity, {column}")


def learning_curves(column: str, metric: str, series: dict[str, dict[str, list[list[float]]]]) -> str:
    """Per method (colour) and set (test solid, val dashed): mean over seeds per epoch with a
    band of ± one sample std where there are two seeds or more."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    with _figure(5.4, 3.4) as fig:
        ax = fig.add_subplot()
        colours = itertools.cycle(f"C{i}" for i in range(10))
        for method, sets in series.items():
            colour = next(colours)
            for split, runs in sets.items():
                n = min(len(r) for r in runs)
                a = np.array([r[:n] for r in runs], dtype=float)
                x = np.arange(1, n + 1)
                mean = a.mean(0)
                style = "-" if split == "test" else "--"
                ax.plot(x, mean, style, color=colour, label=f"{method} {split} (n={len(a)})")
                if len(a) > 1:
                    std = a.std(0, ddof=1)
                    ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(column, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return to_svg(fig, f"learning curves of {metric}, {column}")
