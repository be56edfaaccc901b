"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention").

For each residual stage, the spatial attention map a(f) = normalize(mean_c f^p) (flattened,
unit L2 norm per sample), and

    at = Σ_stages mean( (a(f_s) − a(f_t))² )

Reference: HobbitLong/RepDistiller ``distiller_zoo/AT.py``; stages are RepDistiller's
``feat[1:-1]``. RepDistiller's feat list ends with the pooled feature, which kdbench keeps
apart, so ``feat[1:-1]`` == kdbench ``stages[1:]`` (every stage but the stem). When the two
maps differ in size the larger is adaptive-average-pooled to the smaller, as the reference
does (the reference pools to (H, H); kdbench uses (H, W), identical for square maps).
Defaults: p = 2, β = 1000, CE weight 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.methods._util import check_same_stage_count, match_spatial
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class AT(Distiller):
    """Match normalised spatial attention maps of every residual stage."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "at": 1000.0}

    def __init__(self, ctx: MethodContext, p: float = 2.0):
        super().__init__(ctx)
        check_same_stage_count("at", ctx.student_shapes, ctx.teacher_shapes)
        self.p = p

    def attention(self, f: Tensor) -> Tensor:
        return F.normalize(f.pow(self.p).mean(1).flatten(1))

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        loss = s.logits.new_zeros(())
        for f_s, f_t in zip(s.stages[1:], t.stages[1:], strict=True):
            f_s, f_t = match_spatial(f_s, f_t)
            loss = loss + (self.attention(f_s) - self.attention(f_t)).pow(2).mean()
        return {"at": loss}
