"""Report kinds over one run directory, and what they share.

``kdbench report RUN --kind K`` opens the run's store and calls ``build(run, args) -> Report``
of the module named in :data:`KINDS`; :func:`kdbench.reports.render.render_report` turns the
report's tables into the format asked for. A kind module implements only ``build``; it reads
``run`` (:class:`RunData`: the cells, teachers, per-epoch rows, the run's grid), honours
``args`` (:class:`ReportArgs`: format, metric, selection rule, spread) and uses the helpers
here so every table states its protocol the same way (:meth:`RunData.protocol`,
:func:`footer`). Reports read the store; they never re-run anything.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.metric_defs import metric_info, split_metric
from kdbench.report_choices import FORMATS, KINDS, SELECTS, SPREADS
from kdbench.reports.render import render_report
from kdbench.store import read_epoch_rows

OPTIMISTIC = "optimistic: selected on the test set"


@dataclass
class ReportArgs:
    """The options of ``kdbench report`` (every kind gets all of them; use what applies)."""

    fmt: str = "github"
    metric: str = "top1"
    select: str = "last"
    spread: str = "std"
    baseline: str | None = None
    details: bool = False
    everything: bool = False
    kind: str = "leaderboard"
    #: where a kind that draws (groups) writes its PNG; None: no plot
    plot: str | None = None

    def check(self) -> None:
        for name, value, allowed in (
            ("--format", self.fmt, FORMATS),
            ("--select", self.select, SELECTS),
            ("--spread", self.spread, SPREADS),
            ("--kind", self.kind, tuple(KINDS)),
        ):
            if value not in allowed:
                from kdbench.registry import did_you_mean

                raise KdbenchError(
                    f"unknown {name} {value!r}{did_you_mean(value, list(allowed))}; "
                    f"choose one of {', '.join(allowed)}"
                )


@dataclass
class Selected:
    """The metrics of one cell under the selection rule (bare names are test-set metrics)."""

    metrics: dict[str, float]
    epoch: int | None  # 0-based epoch the numbers come from; None: the final model


def _normalise_row(row: dict) -> dict[str, Any]:
    """Per-epoch row keys as in the seam: ``test_top1`` (older runs) -> ``test/top1``."""
    out = {}
    for k, v in row.items():
        if "/" not in k and k.startswith(("test_", "val_")):
            s, _, m = k.partition("_")
            k = f"{s}/{m}"
        out[k] = v
    return out


@dataclass
class RunData:
    """What a report reads: the cells of the run (any status), its teachers and grid."""

    run_dir: Path
    cells: list[dict]  # store rows: id, status, config, metrics, env, error, wall_s, attempts
    teachers: dict[str, dict] = field(default_factory=dict)  # teacher id -> store row
    grid: dict = field(default_factory=dict)  # the grid last run here, as parsed YAML ({} if absent)
    #: cell id -> per-epoch rows imported into the store (cells absent here: read metrics.jsonl)
    stored_epochs: dict[str, list[dict]] = field(default_factory=dict)
    #: the last ``kdbench run`` pass that ran cells here: wall_s, finished, done/failed/skipped ({}: unknown)
    last_run: dict = field(default_factory=dict)
    _epochs: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    def epochs(self, cell_id: str) -> list[dict]:
        """The student's per-epoch evaluation rows (stage "train"): those imported into the store
        with the cell's result, else (a run imported before they were) ``cells/<id>/metrics.jsonl``."""
        if cell_id not in self._epochs:
            rows = self.stored_epochs.get(cell_id)
            if rows is None:
                rows = read_epoch_rows(self.run_dir / "cells" / cell_id / "metrics.jsonl")
            self._epochs[cell_id] = [_normalise_row(r) for r in rows]
        return self._epochs[cell_id]

    def done(self) -> list[dict]:
        return [c for c in self.cells if c["status"] == "done" and c["metrics"]]

    def selected(self, cell: dict, args: ReportArgs) -> Selected:
        """``cell``'s metrics under ``args.select`` for leaderboard metric ``args.metric``.

        ``last``: the final model's metrics. ``best_val`` / ``best_test``: the epoch with the
        best ``val/<m>`` / ``test/<m>`` in metrics.jsonl (``m`` the metric without its set prefix;
        the earliest epoch on ties); its ``test/*`` values become bare names.
        """
        if args.select == "last":
            return Selected(dict(cell["metrics"] or {}), None)
        split = "val" if args.select == "best_val" else "test"
        base = split_metric(args.metric)[1]
        key = f"{split}/{base}"
        info = metric_info(base)
        rows = [r for r in self.epochs(cell["id"]) if isinstance(r.get(key), int | float)]
        if not rows:
            raise KdbenchError(
                f"--select {args.select} needs per-epoch {key} values, and cell {cell['id']} "
                f"({cell['config']['method']['label']}, seed {cell['config'].get('seed')}) has none in "
                f"{self.run_dir / 'cells' / cell['id'] / 'metrics.jsonl'}; set "
                + ("`eval: {val_fraction: 0.1, every: 1}`" if split == "val" else "`eval: {every: 1}`")
                + " in the grid and run it again, or use --select last"
            )
        higher = info.higher_is_better if info else True
        best = rows[0]
        for r in rows[1:]:
            if (r[key] > best[key]) if higher else (r[key] < best[key]):
                best = r
        metrics = {}
        for k, v in best.items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            metrics[k[len("test/") :] if k.startswith("test/") else k] = float(v)
        target = args.metric[len("test/") :] if args.metric.startswith("test/") else args.metric
        if target not in metrics:
            raise KdbenchError(
                f"--select {args.select}: the epoch rows of cell {cell['id']} hold no {target!r} "
                f"(they have {', '.join(sorted(metrics))}); per-epoch evaluation records only cheap "
                "metrics, so use --select last for this metric"
            )
        return Selected(metrics, int(best.get("epoch", 0)))

    def protocol(self, args: ReportArgs, selected_epochs: list[int] | None = None) -> dict[str, Any]:
        """The fields every table states: rule, epochs, seeds, spread and hardware/threads."""
        done = self.done()
        epochs = sorted({int(c["config"].get("train", {}).get("epochs", 0)) for c in done})
        seeds = sorted({c["config"].get("seed") for c in done if c["config"].get("seed") is not None})
        rule = {
            "last": "last epoch",
            "best_val": f"epoch with the best validation {split_metric(args.metric)[1]}",
            "best_test": f"epoch with the best test {split_metric(args.metric)[1]} ({OPTIMISTIC})",
        }[args.select]
        out = {
            "select": args.select,
            "selection": rule,
            "optimistic": args.select == "best_test",
            "epochs": epochs,
            "seeds": seeds,
            "spread": args.spread,
            "hardware": hardware([c.get("env") or {} for c in done]),
        }
        if selected_epochs:
            out["selected_epochs"] = sorted(e + 1 for e in selected_epochs)  # 1-based, as printed
        costs = [sum(r.get("eval_s", 0.0) for r in self.epochs(c["id"])) for c in done]
        if any(costs):
            out["epoch_eval_s"] = sum(costs) / len(costs)  # what per-epoch evaluation cost a cell
        return out


def hardware(envs: list[dict]) -> list[str]:
    """Distinct "device, N threads, torch X, kernels K" descriptions of the cells' environments."""
    seen: list[str] = []
    for env in envs:
        if not env:
            continue
        device = env.get("device_name") or env.get("device") or ("cuda" if env.get("cuda") else "cpu")
        parts = [str(device)]
        if env.get("cpu"):
            parts.append(str(env["cpu"]))
        if env.get("threads") is not None:
            parts.append(f"{env['threads']} thread" + ("" if env["threads"] == 1 else "s"))
        if env.get("torch"):
            parts.append(f"torch {env['torch']}")
        if env.get("kernels"):
            parts.append(f"kernels {env['kernels']}")
        text = ", ".join(parts)
        if text not in seen:
            seen.append(text)
    return seen


def _ranges(values: list[int]) -> str:
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def footer(protocol: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    """The protocol as sentences (Markdown footer, LaTeX caption)."""
    seeds = protocol["seeds"]
    lines = [
        f"selection: {protocol['selection']}; epochs: {', '.join(map(str, protocol['epochs'])) or '—'}"
        + (
            f" (selected epochs {_ranges(protocol['selected_epochs'])})"
            if protocol.get("selected_epochs")
            else ""
        ),
        f"seeds: {', '.join(map(str, seeds)) or '—'} (n = {len(seeds)}); "
        f"mean ± {SPREAD_LABEL[protocol['spread']]} over seeds, (n) seeds per cell",
        "hardware: " + ("; ".join(protocol["hardware"]) or "not recorded"),
    ]
    if protocol.get("epoch_eval_s"):
        lines.append(f"per-epoch evaluation: {protocol['epoch_eval_s']:.2f} s per cell (mean)")
    return lines + (extra or [])


SPREAD_LABEL = {"std": "sample std", "sem": "standard error", "ci95": "95% CI half-width (t)"}

#: two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def spread(values: list[float], kind: str) -> float:
    """std (sample), sem, or ci95 (t-based half-width) of ``values``; nan for fewer than 2."""
    n = len(values)
    if n < 2:
        return math.nan
    m = sum(values) / n
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    if kind == "std":
        return std
    sem = std / math.sqrt(n)
    if kind == "sem":
        return sem
    return sem * (_T975[n - 2] if n - 1 <= len(_T975) else 1.96)


def load(kind: str) -> Callable[[RunData, ReportArgs], str]:
    """A report kind as ``render(run, args) -> str``: its ``build`` (imported on use) laid out
    in ``args.fmt`` by the one renderer."""
    if kind not in KINDS:
        raise KdbenchError(f"unknown report kind {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        module = importlib.import_module(KINDS[kind])
    except ModuleNotFoundError as e:
        if e.name == KINDS[kind]:
            raise KdbenchError(f"report kind {kind!r} is not available in this version of kdbench") from None
        raise

    def render(run: RunData, args: ReportArgs) -> str:
        if args.fmt == "html":  # a page: kdbench/reports/html.py, above this module (kdbench.report calls it)
            raise KdbenchError("the html format is rendered by kdbench.report.report / kdbench.reports.html")
        return render_report(module.build(run, args), args.fmt)

    return render
