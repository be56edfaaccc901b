"""Consistency training with supervision (Keras example "Consistency training with supervision",
Sayak Paul 2021; the Noisy Student recipe of Xie et al., CVPR 2020, without pseudo-labels).

The student sees a strong view of the batch (RandAugment, 2 ops at magnitude 9: the grid's
``train.views.strong``, whose default is exactly that), the teacher the clean images of the same
batch. The loss is the example's::

    loss = (CE(y, z_s) + KL(softmax(z_t / T) ‖ softmax(z_s / T))) / 2,   T = 10

with the KL averaged over the batch and **not** multiplied by T² (the example uses Keras'
``KLDivergence`` on the softened distributions as they are). ``t_squared: true`` multiplies it
by T² as Hinton et al.'s KD does. The halves are the engine's weights ``ce: 0.5, kd: 0.5``
(change them with ``loss_weights``). The example's teacher is trained with stochastic weight
averaging: ``teacher_train: {swa: ...}``.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class Consistency(Distiller):
    """Student on the strong view, teacher on the clean view, (CE + KL_T) / 2."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.5, "kd": 0.5}
    #: the student trains on the cell's "strong" view (train.views.strong: RandAugment n=2, m=9)
    student_view: ClassVar[str | None] = "strong"
    #: the teacher sees the clean images of the same batch
    teacher_view: ClassVar[str | None] = "clean"

    def __init__(self, ctx: MethodContext, T: float = 10.0, t_squared: bool = False):
        super().__init__(ctx)
        if T <= 0:
            raise ConfigError(f"consistency: T must be > 0, got {T}")
        self.T = T
        self.t_squared = t_squared

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        T = self.T
        kl = F.kl_div(
            F.log_softmax(s.logits.float() / T, dim=1),
            F.softmax(t.logits.float() / T, dim=1),
            reduction="batchmean",
        )
        return {"kd": kl * (T * T) if self.t_squared else kl}
