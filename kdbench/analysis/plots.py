"""``kdbench plot RUN_DIR``: learning curves and the leaderboard as pictures (matplotlib, PNG).

* ``curves.png`` — one panel per (dataset, teacher→student) column: the student's test top-1
  per epoch (``metrics.jsonl``; needs ``eval: {every: N}`` or the older per-epoch rows), one
  line per method, mean over seeds with a ± std band.
* ``leaderboard.png`` — the last-epoch metric per method and column as bars with ± std error bars.

Only the run directory is read; nothing is re-run.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from kdbench.errors import KdbenchError


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise KdbenchError("plots need matplotlib: pip install 'kdbench[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _column(cfg: dict) -> str:
    return f"{cfg['dataset']['name']}: {cfg['teacher']['label']}→{cfg['student']['label']}"


def curves(run, out: Path, metric: str = "top1") -> Path:
    """Test ``metric`` per epoch, mean ± std over seeds, per method; one panel per column."""
    plt = _plt()
    key = f"test/{metric}"
    series: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for cell in run.done():
        ys = [r[key] for r in run.epochs(cell["id"]) if key in r]
        if ys:
            series[_column(cell["config"])][cell["config"]["method"]["label"]].append(ys)
    if not series:
        raise KdbenchError(
            f"{run.run_dir} has no per-epoch {key} rows; run the grid with `eval: {{every: 1}}`"
        )
    ncols = min(3, len(series))
    nrows = -(-len(series) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    for ax, (col, methods) in zip(axes.flat, sorted(series.items()), strict=False):
        for label, runs in sorted(methods.items()):
            n = min(len(r) for r in runs)
            a = np.array([r[:n] for r in runs], dtype=float)
            x = np.arange(1, n + 1)
            mean, std = a.mean(0), a.std(0, ddof=1) if len(a) > 1 else np.zeros(n)
            ax.plot(x, mean, label=f"{label} (n={len(a)})")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test {metric}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def leaderboard(run, out: Path, metric: str = "top1") -> Path:
    """Bars of the final ``metric`` per method and column, ± std over seeds as error bars."""
    plt = _plt()
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in run.done():
        if metric in cell["metrics"]:
            vals[_column(cell["config"])][cell["config"]["method"]["label"]].append(cell["metrics"][metric])
    if not vals:
        raise KdbenchError(f"{run.run_dir} has no finished cells with metric {metric!r}")
    cols = sorted(vals)
    methods = sorted({m for c in cols for m in vals[c]})
    width = 0.8 / max(len(cols), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods) * max(1, len(cols)) + 2), 4))
    x = np.arange(len(methods))
    for i, col in enumerate(cols):
        means = [np.mean(vals[col][m]) if vals[col].get(m) else np.nan for m in methods]
        stds = [np.std(vals[col][m], ddof=1) if len(vals[col].get(m, [])) > 1 else 0.0 for m in methods]
        ax.bar(x + i * width, means, width, yerr=stds, capsize=3, label=col)
    finite = [v for c in cols for m in methods for v in vals[c].get(m, [])]
    lo, hi = min(finite), max(finite)
    pad = max(1.0, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(x + width * (len(cols) - 1) / 2, methods, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "leaderboard.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
