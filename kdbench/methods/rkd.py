"""Relational knowledge distillation (Park et al., CVPR 2019).

On the pooled features, pairwise Euclidean distances normalised by their mean over positive
entries (distance term) and the cosine of the angle formed by every triplet (angle term), each
compared with Huber (smooth-L1, β = 1) loss; the teacher side carries no gradient:

    rkd = w_d · huber(ψ_D(s), ψ_D(t)) + w_a · huber(ψ_A(s), ψ_A(t))

Reference: HobbitLong/RepDistiller ``distiller_zoo/RKD.py`` (pdist clamped at 1e-12, zero
diagonal). Defaults: w_d = 25, w_a = 50, β = 1, CE weight 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def normalized_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise Euclidean distances (zero diagonal) divided by the mean positive distance."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    d = d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))
    return d / d[d > 0].mean()


def triplet_angles(e: Tensor) -> Tensor:
    """cos of the angle at i between j and k, for all (i, j, k), flattened."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return (diff @ diff.transpose(1, 2)).flatten()


class RKD(Distiller):
    """Distance- and angle-wise relations between samples of the batch."""

    batch_relational = True

    taps: ClassVar[Taps] = Taps(student=("logits", "pooled"), teacher=("pooled",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "rkd": 1.0}

    def __init__(self, ctx: MethodContext, w_d: float = 25.0, w_a: float = 50.0):
        super().__init__(ctx)
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        e_s, e_t = s.pooled.flatten(1), t.pooled.flatten(1).detach()
        loss_d = F.smooth_l1_loss(normalized_distances(e_s), normalized_distances(e_t))
        loss_a = F.smooth_l1_loss(triplet_angles(e_s), triplet_angles(e_t))
        return {"rkd": self.w_d * loss_d + self.w_a * loss_a}
