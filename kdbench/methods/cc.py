"""Correlation congruence (Peng et al., ICCV 2019), in the variant of the authors' code.

Student and teacher pooled features are embedded to ``embed_dim`` by two trainable linear
layers (no normalisation), and with Δ = |e_s − e_t| over consecutive samples of the batch:

    cc = mean_{i < B−1} Σ_d Δ_{i,d} · Δ_{i+1,d}

Reference: HobbitLong/RepDistiller ``distiller_zoo/CC.py`` ("code emailed by the original
author", the active ``Correlation``) with ``LinearEmbed`` for both sides (``train_student.py``);
both embeddings are trained with the student. Defaults: embed_dim = 128, β = 0.02, CE weight 1.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class CC(Distiller):
    """Correlation congruence between linearly embedded pooled features."""

    batch_relational = True

    taps: ClassVar[Taps] = Taps(student=("logits", "pooled"), teacher=("pooled",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "cc": 0.02}

    def __init__(self, ctx: MethodContext, embed_dim: int = 128):
        super().__init__(ctx)
        self.embed_s = nn.Linear(ctx.student_shapes["pooled"][0], embed_dim)
        self.embed_t = nn.Linear(ctx.teacher_shapes["pooled"][0], embed_dim)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        delta = (self.embed_s(s.pooled.flatten(1)) - self.embed_t(t.pooled.flatten(1))).abs()
        return {"cc": (delta[:-1] * delta[1:]).sum(1).mean()}
