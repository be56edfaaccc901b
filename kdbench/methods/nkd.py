"""Normalized KD (Yang, Zeng, Yuan & Li, ICCV 2023, "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
Labels", arXiv 2303.13005).

KD split into the target class and the normalised distribution over the other classes. With p
the softmax at T = 1, y the label and p̂ = softmax over the non-target logits only, at temperature T:

    nkd = − mean_b p_t,b[y_b] · log p_s,b[y_b]                       (target term, T = 1)
          − γ · T² · mean_b Σ_{c ≠ y_b} p̂_t,b[c] · log p̂_s,b[c]     (non-target term)

Both terms are cross-entropies (no teacher-entropy term), as in the reference; the teacher is
detached. The weighted total is CE + nkd.

Reference: yzd-v/cls_KD (commit 1e5d48f) ``mmcls/models/dis_losses/nkd.py`` (NKDLoss; the
loss weight is 1 and the distiller adds the student's CE with weight 1). CIFAR-100 defaults from
``configs/distillers/cifar100/res34_distill_res18_cifar.py``: T = 3, γ = 3.5 (the class defaults,
T = 1, γ = 1.5, are the ImageNet configs' ``configs/distillers/imagenet/res34_distill_res18_img.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def nkd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, T: float, gamma: float) -> Tensor:
    """Target term at T = 1 plus γ·T² times the cross-entropy of the normalised non-target distributions."""
    y = y.view(-1, 1)
    p_t_target = F.softmax(z_t, dim=1).gather(1, y)
    log_p_s_target = F.log_softmax(z_s, dim=1).gather(1, y)
    target_term = -(p_t_target * log_p_s_target).mean()
    others = torch.ones_like(z_s, dtype=torch.bool).scatter_(1, y, False)
    n, c = z_s.shape
    zs_o, zt_o = z_s[others].reshape(n, c - 1), z_t[others].reshape(n, c - 1)
    cross = (F.softmax(zt_o / T, dim=1) * F.log_softmax(zs_o / T, dim=1)).sum(1).mean()
    return target_term - gamma * T**2 * cross


class NKD(Distiller):
    """Target-class term plus the normalised non-target distribution of the teacher."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "nkd": 1.0}

    def __init__(self, ctx: MethodContext, T: float = 3.0, gamma: float = 3.5):
        super().__init__(ctx)
        self.T = T
        self.gamma = gamma

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {"nkd": nkd_loss(s.logits, t.logits.detach(), batch.y, self.T, self.gamma)}
