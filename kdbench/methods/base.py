"""The contract every KD method (``kdbench.losses`` plugin) implements.

A method is an ``nn.Module`` subclass of :class:`Distiller`:

* ``taps`` says which features it reads from the student and the teacher
  (``"logits"``, ``"stages"``, ``"preact"``, ``"pooled"``; see :mod:`kdbench.features`).
* ``__init__(self, ctx, **params)`` receives a :class:`MethodContext` (probed feature
  shapes, number of classes, training-set size, ...) and the method's own parameters.
  The parameters' names, defaults and type hints are the method's public interface:
  a grid's ``methods: [{name: {param: value}}]`` is validated against this signature.
* ``forward(s, t, batch)`` returns a dict of named, *unweighted* loss terms. The engine
  multiplies each by its weight (``default_weights`` merged with the grid's ``weights``)
  and adds ``weights["ce"]`` times the cross-entropy of the student's prediction.
* Trainable parts (regressors, embeddings) are submodules; they are optimised with the
  student. The teacher is in eval mode under ``no_grad``; ``t`` holds detached tensors.

Optional hooks, all with safe defaults: ``views`` (extra augmented views, e.g. MLKD's
strong view), ``init_epochs`` / ``init_loss`` / ``init_parameters`` (methods with an
initialisation stage such as AB, FT, FSP), ``predict`` (a method that changes how the
student predicts, e.g. SimKD), ``summary`` (artefacts saved with the run).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

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
    optimiser would see it.
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
    train_targets: Tensor | None = None  # labels of the whole training set, in index order
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Batch:
    """One training batch as a method sees it.

    ``index`` are the samples' positions in the training set (CRD's memory bank).
    ``epoch`` counts from 0; ``epochs`` is the total (for warm-up ramps).
    ``views`` maps each extra view a method asked for to ``(student, teacher)`` features.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    epoch: int = 0
    epochs: int = 1
    step: int = 0
    views: dict[str, tuple[Features, Features]] = field(default_factory=dict)


class Distiller(nn.Module):
    """Base class of every KD method. Subclasses override ``taps``, ``__init__``, ``forward``."""

    taps: ClassVar[Taps] = Taps()
    #: weight of each term ``forward`` returns; "ce" weights the student's cross-entropy
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0}
    #: False for methods that train without a teacher (``ce``, ``lsr``, Tf-KD self mode...)
    requires_teacher: ClassVar[bool] = True
    #: extra augmented views to run both models on, e.g. ("strong",)
    views: ClassVar[tuple[str, ...]] = ()
    #: epochs of an initialisation stage run before distillation (AB, FT, FSP)
    init_epochs: int = 0

    def __init__(self, ctx: MethodContext):
        super().__init__()
        self.ctx = ctx

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


def warmup_factor(batch: Batch, warmup_epochs: float) -> float:
    """Linear ramp min(epoch / warmup, 1) used by DKD and ReviewKD (epoch counted from 1)."""
    if warmup_epochs <= 0:
        return 1.0
    return min((batch.epoch + 1) / warmup_epochs, 1.0)
