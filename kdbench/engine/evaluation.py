"""One evaluation pass: every evaluation set is run once per model, every metric family reads it.

* An :class:`EvalSet` is a named set of samples with metadata: ``test``, ``val`` (when the grid
  asks for one), a dataset's extra sets (``eval_splits()``), and whatever the registered
  set providers add (corruption sets ``c/<corruption>/<severity>``).
* A metric *family* is ``family(logits, y, meta, teacher_logits, ctx) -> {metric: float}``;
  families are listed in :data:`FAMILIES` (classification here; groups and others append).
  ``ctx`` (:class:`EvalContext`) says which set this is, whether only cheap metrics are wanted
  (per-epoch evaluation), the dataset's group definition and the training split's metadata.
* An *aggregate* reads the metrics of every set and returns bare metrics (``corruption_acc``).
* Results are flat (:func:`flatten`): metrics of ``test`` bare (``top1``), of other sets
  prefixed (``val/top1``, ``c/fog/3/top1``), aggregates bare. Per-epoch rows prefix ``test``
  too (``test/top1``).

Extensions register themselves at import: a module listed in :data:`EXTENSIONS` calls
:func:`register_family`, :func:`register_eval_sets` or :func:`register_aggregate`.
The teacher's logits on a set with a ``key`` are computed once per teacher and cached
(checksummed) in its directory, so every cell of a grid reuses them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdbench.datasets.base import GroupInfo
from kdbench.engine.data import Batches
from kdbench.engine.metrics import classification_metrics


@dataclass
class EvalSet:
    """A named evaluation set.

    ``key`` identifies its samples across cells (teacher logits are cached under it; None:
    not cached). ``per_epoch``: evaluated by ``eval.every`` during training (test, val).
    """

    name: str
    batches: Batches
    key: str | None = None
    per_epoch: bool = False

    @property
    def meta(self) -> dict[str, Tensor]:
        return self.batches.meta

    def targets(self) -> Tensor:
        return self.batches.targets()


@dataclass
class EvalContext:
    """What a metric family may know besides the logits."""

    set_name: str = "test"
    #: per-epoch evaluation: compute only cheap metrics (top-1, NLL, worst-group)
    cheap: bool = False
    ece_bins: int = 15
    group_info: GroupInfo | None = None
    #: metadata of the training split (e.g. group proportions for a train-weighted average)
    train_meta: dict[str, Tensor] = field(default_factory=dict)
    train_targets: Tensor | None = None
    #: the test set's (logits, labels, teacher logits or None), once it is evaluated: for
    #: families that compare another set with it (spurious mAUC)
    test_outputs: tuple[Tensor, Tensor, Tensor | None] | None = None


Family = Callable[[Tensor, Tensor, dict[str, Tensor], "Tensor | None", EvalContext], dict[str, float]]
#: (dataset, cell, cache_dir) -> {set name: EvalSet}; ``cache_dir`` is the run's shared cache
SetProvider = Callable[[Any, Any, Path], dict[str, EvalSet]]
#: {set name: {metric: value}} -> bare aggregate metrics
Aggregate = Callable[[dict[str, dict[str, float]]], dict[str, float]]


def classification_family(
    logits: Tensor, y: Tensor, meta: dict[str, Tensor], teacher_logits: Tensor | None, ctx: EvalContext
) -> dict[str, float]:
    """top1/top5, NLL, ECE and teacher agreement; top1 and NLL only when ``ctx.cheap``."""
    if "spurious_only" in (meta or {}):
        return {}  # the images do not show their label's object: no accuracy (robustness/spurious_auc.py)
    if ctx.cheap:
        m = classification_metrics(logits, y, ctx.ece_bins, None)
        return {"top1": m["top1"], "nll": m["nll"]}
    return classification_metrics(logits, y, ctx.ece_bins, teacher_logits)


FAMILIES: list[Family] = [classification_family]
SET_PROVIDERS: list[SetProvider] = []
AGGREGATES: list[Aggregate] = []
#: modules imported before a cell evaluates, so their registrations take effect (absent ones skipped)
EXTENSIONS: list[str] = [
    "kdbench.engine.groups",
    "kdbench.datasets.cifar_c",
    "kdbench.robustness.spurious_auc",
]
_loaded: set[str] = set()


@dataclass
class TrainedModel:
    """A trained model as model hooks see it: hooks need more than logits (pooled features)."""

    role: str  # "student" | "teacher"
    model: Any  # nn.Module, in eval mode while hooks run
    taps: Any  # its features.TapSpec
    logits: Callable[[Tensor], Tensor]
    sets: dict[str, EvalSet]
    train: Batches
    val: Batches | None
    device: torch.device
    ctx: EvalContext
    #: the cell's (or teacher's) eval settings, e.g. {"dfr": True}
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


#: fn(TrainedModel) -> flat metrics; run once per model after its final evaluation pass
ModelHook = Callable[[TrainedModel], dict[str, float]]
MODEL_HOOKS: list[ModelHook] = []


def register_model_hook(fn: ModelHook) -> ModelHook:
    if fn not in MODEL_HOOKS:
        MODEL_HOOKS.append(fn)
    return fn


def model_hooks(m: TrainedModel) -> dict[str, float]:
    """Every registered model hook's metrics for ``m``, merged."""
    load_extensions()
    out: dict[str, float] = {}
    for hook in MODEL_HOOKS:
        out.update(hook(m))
    return out


def register_family(fn: Family) -> Family:
    if fn not in FAMILIES:
        FAMILIES.append(fn)
    return fn


def register_eval_sets(fn: SetProvider) -> SetProvider:
    if fn not in SET_PROVIDERS:
        SET_PROVIDERS.append(fn)
    return fn


def register_aggregate(fn: Aggregate) -> Aggregate:
    if fn not in AGGREGATES:
        AGGREGATES.append(fn)
    return fn


def load_extensions() -> None:
    """Import every module in :data:`EXTENSIONS` that exists (once per process)."""
    for name in EXTENSIONS:
        if name in _loaded:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package is absent
            found = False
        if found:
            importlib.import_module(name)
        _loaded.add(name)


def set_metrics(
    logits: Tensor, y: Tensor, meta: dict[str, Tensor], teacher_logits: Tensor | None, ctx: EvalContext
) -> dict[str, float]:
    """Every family's metrics of one set, merged (later families may not rename earlier ones)."""
    out: dict[str, float] = {}
    if len(y) == 0:
        return out
    for fam in FAMILIES:
        out.update(fam(logits, y, meta, teacher_logits, ctx))
    return out


def flatten(per_set: dict[str, dict[str, float]], bare: str | None = "test") -> dict[str, float]:
    """``{set: {metric: v}}`` -> flat names: the ``bare`` set unprefixed, others ``set/metric``."""
    flat: dict[str, float] = {}
    for name, metrics in per_set.items():
        for k, v in metrics.items():
            flat[k if name == bare else f"{name}/{k}"] = v
    return flat


def aggregates(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for agg in AGGREGATES:
        out.update(agg(per_set))
    return out


@torch.no_grad()
def predict(fn: Callable[[Tensor], Tensor], batches: Batches, device: torch.device) -> Tensor:
    """Logits of ``fn`` (a model in eval mode) on a whole set, in order, float32 on the CPU."""
    outs = [fn(x.to(device, non_blocking=True)).float().cpu() for x, _, _ in batches.iterate(None, False)]
    return torch.cat(outs) if outs else torch.empty(0)


class TeacherLogits:
    """The teacher's logits per evaluation set: computed once, kept, and cached on disk by set key."""

    def __init__(self, fn: Callable[[Tensor], Tensor], device: torch.device, cache_dir: Path | None):
        self.fn = fn
        self.device = device
        self.cache_dir = cache_dir
        self._mem: dict[str, Tensor] = {}

    def __call__(self, s: EvalSet) -> Tensor:
        if s.name in self._mem:
            return self._mem[s.name]
        from kdbench.artifacts import ArtifactCorrupt, load_checked, save_checked

        path = None
        if self.cache_dir is not None and s.key is not None:
            path = self.cache_dir / f"{_safe(s.key)}.pt"
        logits = None
        if path is not None and path.exists():
            try:
                logits = load_checked(path)
            except ArtifactCorrupt:
                logits = None
            if logits is not None and len(logits) != len(s.batches):
                logits = None
        if logits is None:
            logits = predict(self.fn, s.batches, self.device)
            if path is not None:
                save_checked(logits, path)
        self._mem[s.name] = logits
        return logits


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)


def evaluate(
    fn: Callable[[Tensor], Tensor],
    sets: dict[str, EvalSet],
    device: torch.device,
    base_ctx: EvalContext,
    teacher: TeacherLogits | None = None,
    cheap: bool = False,
) -> dict[str, dict[str, float]]:
    """Run ``fn`` once over each set and every family over its logits: ``{set: {metric: v}}``.

    ``test`` goes first; families of the later sets see its outputs (``ctx.test_outputs``).
    """
    per_set: dict[str, dict[str, float]] = {}
    test_outputs = None
    for name in sorted(sets, key=lambda n: n != "test"):
        s = sets[name]
        logits = predict(fn, s.batches, device)
        t_logits = teacher(s) if teacher is not None else None
        ctx = EvalContext(
            set_name=name,
            cheap=cheap,
            ece_bins=base_ctx.ece_bins,
            group_info=base_ctx.group_info,
            train_meta=base_ctx.train_meta,
            train_targets=base_ctx.train_targets,
            test_outputs=test_outputs,
        )
        per_set[name] = set_metrics(logits, s.targets(), s.meta, t_logits, ctx)
        if name == "test":
            test_outputs = (logits, s.targets(), t_logits)
    return per_set


def final_metrics(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat result metrics: test bare, other sets prefixed, aggregates bare."""
    return {**flatten(per_set, bare="test"), **aggregates(per_set)}


def epoch_metrics(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat per-epoch metrics: every set prefixed (``test/top1``, ``val/top1``)."""
    return flatten(per_set, bare=None)
