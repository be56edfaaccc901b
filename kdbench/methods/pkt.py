"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

Cosine similarities of the pooled features, mapped to [0, 1] and normalised per row into
conditional distributions P (student) and Q (teacher) over the batch; then

    pkt = mean_{i,j} Q_ij · log( (Q_ij + ε) / (P_ij + ε) ),   ε = 1e-7

(the features are divided by ‖f‖ + ε first). Reference: HobbitLong/RepDistiller
``distiller_zoo/PKT.py`` (the authors' code), including its mean over all B × B entries.
Defaults: ε = 1e-7, β = 30000, CE weight 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def cosine_distribution(f: Tensor, eps: float) -> Tensor:
    """Row-normalised (cos + 1) / 2 similarity matrix of a batch of vectors."""
    f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
    f = f.masked_fill(f.isnan(), 0.0)  # as the reference: a zero vector gives 0, not NaN
    sim = (f @ f.T + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


class PKT(Distiller):
    """KL between teacher and student cosine-similarity distributions over the batch."""

    batch_relational = True

    taps: ClassVar[Taps] = Taps(student=("logits", "pooled"), teacher=("pooled",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "pkt": 30000.0}

    def __init__(self, ctx: MethodContext, eps: float = 1e-7):
        super().__init__(ctx)
        self.eps = eps

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        p = cosine_distribution(s.pooled.flatten(1), self.eps)
        q = cosine_distribution(t.pooled.flatten(1), self.eps)
        return {"pkt": (q * torch.log((q + self.eps) / (p + self.eps))).mean()}
