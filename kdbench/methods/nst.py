"""Neuron selectivity transfer (Huang & Wang, 2017, "Like What You Like").

Each channel's activation map, flattened and L2-normalised, is a sample; NST is the squared
MMD between the student's and teacher's channel distributions with the polynomial kernel
k(a, b) = (aᵀb)² (degree 2, c = 0), summed over the residual stages:

    nst = Σ_stages mean k(t, t) + mean k(s, s) − 2 mean k(s, t)

The teacher–teacher term is constant (no gradient) but kept, as in the reference, so the
value is the full MMD. Reference: HobbitLong/RepDistiller ``distiller_zoo/NST.py``
(``full_loss = True``). Stages: ``stages[1:]`` (RepDistiller ``feat[1:-1]``, see :mod:`.at`);
the larger map is adaptive-average-pooled to the smaller's size, as in the reference.
Defaults: β = 50, CE weight 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.methods._util import check_same_stage_count, match_spatial
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean over the batch and all channel pairs of (a_iᵀ b_j)²; a, b are (B, C, HW)."""
    return (b @ a.transpose(1, 2)).pow(2).mean()


class NST(Distiller):
    """Squared MMD (polynomial kernel) between student and teacher channel activations."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "nst": 50.0}

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        check_same_stage_count("nst", ctx.student_shapes, ctx.teacher_shapes)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        loss = s.logits.new_zeros(())
        for f_s, f_t in zip(s.stages[1:], t.stages[1:], strict=True):
            f_s, f_t = match_spatial(f_s, f_t)
            f_s = F.normalize(f_s.flatten(2), dim=2)
            f_t = F.normalize(f_t.flatten(2), dim=2)
            tt = poly_kernel_mean(f_t, f_t).detach()
            loss = loss + tt + poly_kernel_mean(f_s, f_s) - 2 * poly_kernel_mean(f_s, f_t)
        return {"nst": loss}
