"""Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network").

    kd = T² · mean_b KL( softmax(z_t / T) ‖ softmax(z_s / T) )

Reference: HobbitLong/RepDistiller ``distiller_zoo/KD.py`` (``kl_div(..., size_average=False)
· T² / B``, i.e. batch-mean KL · T²). Defaults: T = 4; RepDistiller's CIFAR-100 scripts weight
the cross-entropy γ = 0.1 and the KD term α = 0.9. Computed by the fused ``kernels.kd_loss``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class KD(Distiller):
    """Temperature-scaled KL between teacher and student class distributions."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.1, "kd": 0.9}

    def __init__(self, ctx: MethodContext, T: float = 4.0):
        super().__init__(ctx)
        self.T = T

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {"kd": kd_loss(s.logits, t.logits, self.T)}
