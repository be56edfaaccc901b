"""The contract every KD method (``kdbench.losses`` plugin) implements.

A method is an ``nn.Module`` subclass of :class:`Distiller`:

* ``taps`` says which features it reads from the student and the teacher
  (``"logits"``, ``"stages"``, ``"preact"``, ``"pooled"``; see :mod:`kdbench.features`).
* ``__init__(self, ctx, **params)`` receives a :class:`MethodContext` (probed feature
  shapes, number of classes, training-set size, ...) and the method's own parameters.
  The parameters' names, defaults and type hints are the method's public interface:
  a grid's ``methods: [{name: {param: value}}]`` is validated against this signature.
* ``forward(s, t, batch)`` returns a dict of named, *unweighted* loss terms. The engine
  multiplies each by its weight (``default_weights`` merged with the grid's ``loss_weights``)
  and adds ``weights["ce"]`` times the cross-entropy of the student's prediction.
* Trainable parts (regressors, embeddings) are submodules; they are optimised with the
  student. The teacher is in eval mode under ``no_grad``; ``t`` holds detached tensors.

Every other hook, with its default (the engine calls nothing else):

=============================  ============================================================
``requires_teacher``           class var; False for methods trained without a teacher
``needs_teacher(**params)``    classmethod: does a method with these params use the teacher?
``taps_for(**params)``         classmethod: the :class:`Taps` read with these params
``weights_for(**params)``      classmethod: the default weights with these params
``views``                      class var: extra augmented views (e.g. MLKD's ``("strong",)``);
                               ``batch.views[name]`` holds both models' features on it
``teacher_view``               class var: what the teacher sees, ``"student"`` (the
                               student's augmented batch), ``"clean"`` or an augmenter name;
                               a grid's ``train.teacher_view`` other than "student" wins
``student_view``               class var: the student's augmentation when the grid leaves
                               ``train.augment`` at "none": a view name of ``train.views``
                               (e.g. ``"strong"``) or an augmenter name; None: the grid's
                               ``train.augment``
``init_epochs``                epochs of an initialisation stage (AB, FT, FSP), 0: none
``init_loss(s, t, batch)``     loss terms of that stage
``init_parameters(student)``   what that stage optimises (default: student and method)
``begin_stage(name)``          called when stage ``"init"`` or ``"train"`` starts (FT freezes
                               its paraphraser at ``"train"``); also on resume
``predict(s)``                 the student's logits for CE and evaluation (SimKD)
``summary()``                  JSON artefacts recorded in the result (e.g. a grouping)
=============================  ============================================================

A method that computes something from the student's features that ``forward`` and
``predict`` share caches it in ``s.cache`` (a dict living as long as that forward pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features


@dataclass(frozen=True)
class Taps:
    """Which features a method reads from each model."""

    student: tuple[str, ...] = ("logits",)
    teacher: tuple[str, ...] = ("logits",)


@dataclass
class MethodContext:
    """What a method may know when it is built.

    ``student_shapes`` / ``teacher_shapes`` are :meth:`Features.shapes` of one probe batch
    (per-sample shapes, no batch dimension). ``student_probe`` / ``teacher_probe`` are the
    detached features of that probe batch (``probe_size`` training images), for methods
    that fit something to the models before training (CKA grouping).
    ``teacher_classifier`` is the teacher's final linear layer, frozen; do not register
    it as a submodule (store it in a tuple or with ``object.__setattr__``) or the
    optimiser would see it. ``student_classifier`` is the student's own final linear layer
    (trained with the student; keep it out of the module tree too), for methods that apply
    it to other features (SDD's region logits).
    """

    num_classes: int
    num_train: int
    epochs: int
    batch_size: int
    student_shapes: dict = field(default_factory=dict)
    teacher_shapes: dict = field(default_factory=dict)
    student_probe: Features | None = None
    teacher_probe: Features | None = None
    teacher_classifier: nn.Module | None = None
    student_classifier: nn.Module | None = None
    train_targets: Tensor | None = None  # labels of the whole training set, in index order
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def stage_maps(self, layer: int, method: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The (C, H, W) shapes of ``stages[layer]`` in the student and the teacher; a config error
        naming ``method`` when either is not a feature map."""
        s_shape = tuple(self.student_shapes["stages"][layer])
        t_shape = tuple(self.teacher_shapes["stages"][layer])
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(
                f"{method} distils (C, H, W) feature maps, but stages[{layer}] is {s_shape} in the student "
                f"and {t_shape} in the teacher; choose a `layer` that is a feature map in both"
            )
        return s_shape, t_shape


@dataclass
class Batch:
    """One training batch as a method sees it.

    ``index`` are the samples' positions in the training set (CRD's memory bank).
    ``epoch`` counts from 0; ``epochs`` is the total (for warm-up ramps).
    ``views`` maps each extra view a method asked for to ``(student, teacher)`` features.
    ``x`` is the student's view of the batch; ``meta`` the samples' metadata (index-aligned).
    """

    x: Tensor
    y: Tensor
    index: Tensor
    epoch: int = 0
    epochs: int = 1
    step: int = 0
    views: dict[str, tuple[Features, Features]] = field(default_factory=dict)
    #: per-sample metadata of the batch (e.g. ``"group"``), from the dataset's ``meta()``
    meta: dict[str, Tensor] = field(default_factory=dict)


class Distiller(nn.Module):
    """Base class of every KD method. Subclasses override ``taps``, ``__init__``, ``forward``."""

    taps: ClassVar[Taps] = Taps()
    #: weight of each term ``forward`` returns; "ce" weights the student's cross-entropy
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0}
    #: False for methods that train without a teacher (``ce``, ``lsr``, Tf-KD self mode...)
    requires_teacher: ClassVar[bool] = True
    #: extra augmented views to run both models on, e.g. ("strong",)
    views: ClassVar[tuple[str, ...]] = ()
    #: the teacher's view: "student", "clean" or an augmenter name; None: the grid decides
    teacher_view: ClassVar[str | None] = None
    #: the student's view when the grid sets no ``train.augment``: a view name or an augmenter name
    student_view: ClassVar[str | None] = None
    #: True when the loss relates the samples of a batch to each other (pairwise distances,
    #: batch correlations): refused under DDP, where a rank sees only its shard of the batch
    batch_relational: ClassVar[bool] = False
    #: epochs of an initialisation stage run before distillation (AB, FT, FSP)
    init_epochs: int = 0

    def __init__(self, ctx: MethodContext):
        super().__init__()
        self.ctx = ctx

    @classmethod
    def needs_teacher(cls, **params: Any) -> bool:
        """Whether a method built with ``params`` uses the teacher (default ``requires_teacher``)."""
        return cls.requires_teacher

    @classmethod
    def taps_for(cls, **params: Any) -> Taps:
        """The features a method built with ``params`` reads (default ``taps``)."""
        return cls.taps

    @classmethod
    def weights_for(cls, **params: Any) -> dict[str, float]:
        """Default loss weights of a method built with ``params`` (default ``default_weights``)."""
        return dict(cls.default_weights)

    def begin_stage(self, stage: str) -> None:
        """Called when stage ``"init"`` or ``"train"`` starts (also when resuming into it)."""

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def init_loss(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        """Loss terms of the initialisation stage (only called when ``init_epochs > 0``)."""
        raise NotImplementedError

    def init_parameters(self, student: nn.Module) -> Iterator[nn.Parameter]:
        """Parameters the initialisation stage optimises; default: student and method."""
        yield from student.parameters()
        yield from self.parameters()

    def predict(self, s: Features) -> Tensor:
        """The student's logits for cross-entropy and evaluation."""
        assert s.logits is not None
        return s.logits

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable artefacts recorded in the cell's result (e.g. a chosen grouping)."""
        return {}

    def describe(self) -> str:
        """What this instance built for its pair, in a few words (``kdbench run --dry-run`` shows
        it beside the parameters; e.g. OFA's projector per stage); "" when nothing is chosen."""
        return ""


def warmup_factor(batch: Batch, warmup_epochs: float) -> float:
    """Linear ramp min(epoch / warmup, 1) used by DKD and ReviewKD (epoch counted from 1)."""
    if warmup_epochs <= 0:
        return 1.0
    return min((batch.epoch + 1) / warmup_epochs, 1.0)
