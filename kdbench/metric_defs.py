"""Metric declarations: what each metric means and which direction is better.

Reports read these declarations instead of a hard-coded list. A name is declared once,
either exactly (``"top1"``) or as a pattern whose ``*`` stands for one path segment
(``"group/*/acc"``). Evaluation sets prefix the names they produce (``"val/top1"``,
``"c/fog/3/top1"``, ``"test_reversed/worst_group"``); :func:`metric_info` strips such
prefixes and :func:`split_metric` tells the set from the metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Aggregate = Literal["mean", "sum", "last"]


@dataclass(frozen=True)
class MetricInfo:
    """One declared metric (or pattern of metrics)."""

    name: str
    higher_is_better: bool
    label: str
    family: str
    #: how the values of the seeds of one (method, column) combine
    aggregate: Aggregate = "mean"

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


_EXACT: dict[str, MetricInfo] = {}
_PATTERNS: dict[str, MetricInfo] = {}


def register_metric(
    name: str,
    higher_is_better: bool,
    label: str | None = None,
    family: str = "classification",
    aggregate: Aggregate = "mean",
) -> MetricInfo:
    """Declare a metric (``*`` in ``name`` matches one path segment); re-declaring replaces it."""
    info = MetricInfo(name, bool(higher_is_better), label or name, family, aggregate)
    (_PATTERNS if "*" in name else _EXACT)[name] = info
    return info


def _match(pattern: str, name: str) -> bool:
    p, n = pattern.split("/"), name.split("/")
    return len(p) == len(n) and all(a == "*" or a == b for a, b in zip(p, n, strict=True))


def _lookup(name: str) -> MetricInfo | None:
    if name in _EXACT:
        return _EXACT[name]
    for pattern, info in _PATTERNS.items():
        if _match(pattern, name):
            return info
    return None


def split_metric(name: str) -> tuple[str, str]:
    """``"c/fog/3/top1"`` -> ``("c/fog/3", "top1")``; a bare name is a test-set metric.

    The longest declared suffix wins; an undeclared name is treated as bare.
    """
    parts = name.split("/")
    for i in range(len(parts)):
        tail = "/".join(parts[i:])
        if _lookup(tail) is not None:
            return ("/".join(parts[:i]) or "test", tail)
    return ("test", name)


def metric_info(name: str) -> MetricInfo | None:
    """The declaration behind ``name`` (prefixed names resolve to their metric), or None."""
    return _lookup(split_metric(name)[1])


def declared() -> list[str]:
    """Every declared name and pattern, in declaration order."""
    return [*_EXACT, *_PATTERNS]


# --- built-in declarations (families listed in kdbench/engine/evaluation.py)
register_metric("top1", True, "top-1 (%)")
register_metric("top5", True, "top-5 (%)")
register_metric("nll", False, "NLL")
register_metric("ece", False, "ECE (%)")
register_metric("agreement", True, "agreement with teacher (%)")
register_metric("wall_s", False, "wall time (s)", family="cost")
register_metric("train_s", False, "train time per epoch (s)", family="cost")
register_metric("eval_s", False, "evaluation time (s)", family="cost")
# group robustness (kdbench/engine/groups.py)
register_metric("worst_group", True, "worst-group acc (%)", family="groups")
register_metric("mean_group", True, "mean-group acc (%)", family="groups")
register_metric("avg_acc", True, "average acc (%)", family="groups")
register_metric(
    "adj_avg_acc", True, "train-weighted average acc (%) (group_DRO adj_acc_avg)", family="groups"
)
register_metric("group/*/acc", True, "group acc (%)", family="groups")
register_metric("group/*/n", True, "group size", family="groups", aggregate="last")
register_metric("group/*/agreement", True, "group agreement with teacher (%)", family="groups")
register_metric("group/*/teacher_acc", True, "teacher's group acc (%)", family="groups")
register_metric("group/*/err_inherited", False, "group error shared with the teacher (%)", family="groups")
register_metric("group/*/err_own", False, "group error where the teacher is right (%)", family="groups")
# spurious-feature scan of pooled features (Cohen's d of attribute values within a class)
register_metric("scan/max", False, "max attribute separation (d)", family="groups")
register_metric("scan/mean", False, "mean attribute separation (d)", family="groups")
register_metric("scan/*/score", False, "attribute separation of a top dimension (d)", family="groups")
register_metric("scan/*/dim", True, "index of a top dimension", family="groups", aggregate="last")
register_metric("dfr/on_val", True, "DFR fitted on val (1) or train (0)", family="groups", aggregate="last")
# corruption robustness (kdbench/robustness/corruptions.py)
register_metric("corruption_acc", True, "corruption acc (%)", family="corruptions")
register_metric("corruption_rel_drop", False, "relative drop under corruption (%)", family="corruptions")
register_metric("teacher_top1", True, "teacher top-1 on a corrupted set (%)", family="corruptions")
# spurious mAUC on a set of spurious-only images (kdbench/robustness/spurious_auc.py)
# (labels follow the set's name in reports: "spurious mAUC")
register_metric("mauc", True, "mAUC", family="spurious")
register_metric("mean_ap", True, "mean AP (the reference script's score)", family="spurious")
register_metric("as_class", False, "images predicted as their feature's class (%)", family="spurious")
register_metric("auc_classes", True, "classes scored", family="spurious", aggregate="last")
register_metric("class/*/auc", True, "AUC of a class", family="spurious")
register_metric("teacher_mauc", True, "teacher's mAUC", family="spurious")
