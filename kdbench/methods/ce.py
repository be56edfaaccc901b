"""Cross-entropy only: the student trained without a teacher (the baseline every table needs).

Loss: ``γ · CE(student(x), y)`` with γ = 1; the engine computes the cross-entropy, so this
method returns no terms of its own. Reference: the "vanilla" student of RepDistiller's
``train_student.py`` / mdistiller's ``Vanilla`` distiller.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class CE(Distiller):
    """The student alone, trained with the engine's cross-entropy term."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=())
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0}
    requires_teacher: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {}
