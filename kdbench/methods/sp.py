"""Similarity-preserving KD (Tung & Mori, ICCV 2019).

The batch Gram matrix of the flattened penultimate-stage activations, each row L2-normalised:
G = normalize_rows(F Fᵀ), and

    sp = ‖G_t − G_s‖²_F / B²

Reference: HobbitLong/RepDistiller ``distiller_zoo/SP.py``; the stage is RepDistiller's
``feat[-2]`` == kdbench ``stages[-1]`` (the last stage before pooling). Student and teacher
maps may differ in shape: only the B × B Grams are compared. Defaults: β = 3000, CE weight 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def similarity(f: Tensor) -> Tensor:
    """Row-normalised B × B Gram of the flattened activations."""
    f = f.flatten(1)
    return F.normalize(f @ f.T)


class SP(Distiller):
    """Match row-normalised batch similarity matrices of the last stage."""

    batch_relational = True

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "sp": 3000.0}

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        f_s = s.stages[-1]
        b = f_s.shape[0]
        return {"sp": (similarity(t.stages[-1]) - similarity(f_s)).pow(2).sum() / (b * b)}
