"""Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network").

    kd = T² · mean_b KL( softmax(z_t / T) ‖ softmax(z_s / T) )

Reference: HobbitLong/RepDistiller ``distiller_zoo/KD.py`` (``kl_div(..., size_average=False)
· T² / B``, i.e. batch-mean KL · T²). Defaults: T = 4; RepDistiller's CIFAR-100 scripts weight
the cross-entropy γ = 0.1 and the KD term α = 0.9. Computed by the fused ``kernels.kd_loss``.

``standardize: true`` is logit standardization (Sun et al., CVPR 2024; see
:mod:`kdbench.methods._standardize`): z and z_t are z-scored per sample and divided by
``base_T`` (default 2) instead of T, τ² kept; the default weights become CE 0.1, kd 9 — the
authors' ``tools/train.py --logit-stand --base-temp 2 --kd-weight 9`` on
``configs/cifar100/kd/*.yaml`` (sunshangquan/logit-standardization-KD, commit f6e5aa5).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods._standardize import BASE_T, KD_WEIGHT, check_base_temperature, zscore
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class KD(Distiller):
    """Temperature-scaled KL between teacher and student class distributions."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.1, "kd": 0.9}
    #: parameters added after the first release: recorded in a cell only when a grid sets them
    added_params: ClassVar[frozenset[str]] = frozenset({"standardize", "base_T"})

    @classmethod
    def weights_for(cls, standardize: bool = False, **_params: Any) -> dict[str, float]:
        return {"ce": 0.1, "kd": KD_WEIGHT} if standardize else dict(cls.default_weights)

    def __init__(self, ctx: MethodContext, T: float = 4.0, standardize: bool = False, base_T: float = BASE_T):
        super().__init__(ctx)
        check_base_temperature("kd", standardize, T, 4.0)
        self.T = base_T if standardize else T
        self.standardize = standardize

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        z_s, z_t = s.logits, t.logits
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        return {"kd": kd_loss(z_s, z_t, self.T)}
