"""Multi-level logit distillation (Jin, Wang & Lin, CVPR 2023).

Student and teacher see a weak and a strong augmentation of each image (``views =
("strong",)``; ``s`` / ``t`` are the weak view, ``batch.views["strong"]`` the strong one).
Over temperatures T ∈ {2, 3, 4, 5, 6}, with P = softmax(Z / T):

* instance level ``kd``: KL(P_t ‖ P_s) · T² (batch mean), per view;
* batch level ``bc``:  ‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B;
* class level ``cc``:  ‖P_tᵀ P_t − P_sᵀ P_s‖²_F / C.

Confidence masking uses the teacher's weak-view softmax (T = 1): samples whose max probability
is ≤ its batch median (np.percentile 50, linear), classes whose summed probability is ≤ the
class median. As the reference applies the masks to already batch-averaged losses
(``(loss * mask).mean()``), a mask acts as the scalar factor mean(mask). The terms are exactly
those of the reference's loss dict:

    kd  = Σ_T m̄·kd_weak(T) + Σ_{T∈{T0,3,5}} kd_strong(T) + Σ_{T∈{2,6}} kd_weak(T)
    cc  = Σ_T c̄·cc_weak(T)
    bc  = Σ_T m̄·bc_weak(T)
    ce_strong = CE(student strong-view logits, y)

(the reference's "strong" sum takes T = 2, 6 on the weak logits, and computes strong-view cc /
bc without using them; both kept so the total matches). The engine adds ``ce`` on the weak view.
Reference: Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/distillers/KD_ours.py`` with
``mdistiller/engine/cfg.py``: T0 = 4, CE weight 0.1 (weak and strong), KD weight 0.9 (on every
distillation term). If the engine supplies no strong view, the weak view stands in for it
(the strong-view terms then repeat the weak-view ones).

``standardize: true`` is logit standardization (Sun et al., CVPR 2024; see
:mod:`kdbench.methods._standardize`), as the authors' ``mdistiller/distillers/MLKD.py``
(sunshangquan/logit-standardization-KD, commit f6e5aa5) applies it: only the ``kd`` terms see
z-scored logits; ``cc``, ``bc`` and the confidence masks keep the raw logits. T0 becomes
``base_T`` (default 2; the other temperatures stay 2, 3, 5, 6) and the kd, cc and bc weights 9
(``tools/train.py --logit-stand --base-temp 2 --kd-weight 9``; CE weights stay 0.1).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods._standardize import BASE_T, KD_WEIGHT, check_base_temperature, zscore
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

# besides T0, fixed in the reference; its "strong" KD sum runs T0, 3, 5 on the strong view
# and 2, 6 on the weak view
_STRONG_TEMPERATURES = (3.0, 5.0)
_WEAK_TEMPERATURES = (2.0, 6.0)


def batch_consistency(z_s: Tensor, z_t: Tensor, T: float) -> Tensor:
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / z_s.shape[0]


def class_consistency(z_s: Tensor, z_t: Tensor, T: float) -> Tensor:
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / z_s.shape[1]


def median_mask_fraction(x: Tensor) -> Tensor:
    """Fraction of entries ≤ the median (linear-interpolated 50th percentile)."""
    return (x <= torch.quantile(x, 0.5)).to(x.dtype).mean()


class MLKD(Distiller):
    """Instance-, batch- and class-level logit alignment over several temperatures and two views."""

    batch_relational = True

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {
        "ce": 0.1,
        "ce_strong": 0.1,
        "kd": 0.9,
        "cc": 0.9,
        "bc": 0.9,
    }
    views: ClassVar[tuple[str, ...]] = ("strong",)
    #: parameters added after the first release: recorded in a cell only when a grid sets them
    added_params: ClassVar[frozenset[str]] = frozenset({"standardize", "base_T"})

    @classmethod
    def weights_for(cls, standardize: bool = False, **_params: Any) -> dict[str, float]:
        weights = dict(cls.default_weights)
        if standardize:
            weights.update(kd=KD_WEIGHT, cc=KD_WEIGHT, bc=KD_WEIGHT)
        return weights

    def __init__(self, ctx: MethodContext, T: float = 4.0, standardize: bool = False, base_T: float = BASE_T):
        super().__init__(ctx)
        check_base_temperature("mlkd", standardize, T, 4.0)
        self.T = base_T if standardize else T
        self.standardize = standardize

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        zs_w, zt_w = s.logits, t.logits.detach()
        s_strong, t_strong = batch.views.get("strong", (s, t))
        zs_s, zt_s = s_strong.logits, t_strong.logits.detach()
        p_t = F.softmax(zt_w.float(), dim=1)
        m = median_mask_fraction(p_t.max(1).values).to(zs_w.dtype)
        c = median_mask_fraction(p_t.sum(0)).to(zs_w.dtype)
        strong_temps = (self.T, *_STRONG_TEMPERATURES)
        temps = strong_temps + _WEAK_TEMPERATURES
        # logit standardization applies to the KL terms only, as in the reference
        ks_w, kt_w, ks_s, kt_s = zs_w, zt_w, zs_s, zt_s
        if self.standardize:
            ks_w, kt_w, ks_s, kt_s = (zscore(z) for z in (zs_w, zt_w, zs_s, zt_s))
        kd = sum(m * kd_loss(ks_w, kt_w, T) for T in temps)
        kd = kd + sum(kd_loss(ks_s, kt_s, T) for T in strong_temps)
        kd = kd + sum(kd_loss(ks_w, kt_w, T) for T in _WEAK_TEMPERATURES)
        cc = sum(c * class_consistency(zs_w, zt_w, T) for T in temps)
        bc = sum(m * batch_consistency(zs_w, zt_w, T) for T in temps)
        return {"ce_strong": F.cross_entropy(zs_s, batch.y), "kd": kd, "cc": cc, "bc": bc}
