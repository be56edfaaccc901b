"""Decoupled knowledge distillation (Zhao et al., CVPR 2022).

KD's KL splits into a target-class term and a non-target term, re-weighted:

    dkd = w(epoch) · T² · ( α · KL(b_t ‖ b_s) + β · KL(q̂_t ‖ q̂_s) )

where b = (p_target, 1 − p_target) is the binary target/rest distribution and q̂ the
distribution over the non-target classes, all at temperature T; w(epoch) = min(epoch / warmup, 1)
with epochs counted from 1 (:func:`warmup_factor`).

Reference: megvii-research/mdistiller ``mdistiller/distillers/DKD.py``. Defaults (CIFAR-100
config): α = 1, β = 8, T = 4, warmup = 20 epochs, CE weight 1. Computed by the fused
``kernels.dkd_loss``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdbench.features import Features
from kdbench.kernels import dkd_loss
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps, warmup_factor


class DKD(Distiller):
    """Target-class (TCKD) plus non-target-class (NCKD) KL, with a linear warm-up."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "dkd": 1.0}

    def __init__(
        self, ctx: MethodContext, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: float = 20.0
    ):
        super().__init__(ctx)
        self.alpha = alpha
        self.beta = beta
        self.T = T
        self.warmup = warmup

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        loss = dkd_loss(s.logits, t.logits, batch.y, self.alpha, self.beta, self.T)
        return {"dkd": warmup_factor(batch, self.warmup) * loss}
