"""Decoupled knowledge distillation (Zhao et al., CVPR 2022).

KD's KL splits into a target-class term and a non-target term, re-weighted:

    dkd = w(epoch) · T² · ( α · KL(b_t ‖ b_s) + β · KL(q̂_t ‖ q̂_s) )

where b = (p_target, 1 − p_target) is the binary target/rest distribution and q̂ the
distribution over the non-target classes, all at temperature T; w(epoch) = min(epoch / warmup, 1)
with epochs counted from 1 (:func:`warmup_factor`).

Reference: megvii-research/mdistiller ``mdistiller/distillers/DKD.py``. Defaults (CIFAR-100
config): α = 1, β = 8, T = 4, warmup = 20 epochs, CE weight 1. Computed by the fused
``kernels.dkd_loss``.

``standardize: true`` is logit standardization (Sun et al., CVPR 2024; see
:mod:`kdbench.methods._standardize`): both logits z-scored per sample, temperature ``base_T``
(default 2) instead of T, T² kept. The authors (sunshangquan/logit-standardization-KD, commit
f6e5aa5, ``tools/train.py --logit-stand --base-temp 2 --kd-weight 9``) multiply α and β by 9;
here the dkd weight becomes 9 instead (the same total), so ``beta`` keeps its meaning and the
preset's per-pair β still applies. Their logs use other per-pair values (e.g. vgg13→vgg8:
base_T 2, weight 15, β 2).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from kdbench.features import Features
from kdbench.kernels import dkd_loss
from kdbench.methods._standardize import BASE_T, KD_WEIGHT, check_base_temperature, zscore
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps, warmup_factor


class DKD(Distiller):
    """Target-class (TCKD) plus non-target-class (NCKD) KL, with a linear warm-up."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "dkd": 1.0}
    #: parameters added after the first release: recorded in a cell only when a grid sets them
    added_params: ClassVar[frozenset[str]] = frozenset({"standardize", "base_T"})

    @classmethod
    def weights_for(cls, standardize: bool = False, **_params: Any) -> dict[str, float]:
        return {"ce": 1.0, "dkd": KD_WEIGHT} if standardize else dict(cls.default_weights)

    def __init__(
        self,
        ctx: MethodContext,
        alpha: float = 1.0,
        beta: float = 8.0,
        T: float = 4.0,
        warmup: float = 20.0,
        standardize: bool = False,
        base_T: float = BASE_T,
    ):
        super().__init__(ctx)
        check_base_temperature("dkd", standardize, T, 4.0)
        self.alpha = alpha
        self.beta = beta
        self.T = base_T if standardize else T
        self.warmup = warmup
        self.standardize = standardize

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        z_s, z_t = s.logits, t.logits
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        loss = dkd_loss(z_s, z_t, batch.y, self.alpha, self.beta, self.T)
        return {"dkd": warmup_factor(batch, self.warmup) * loss}
