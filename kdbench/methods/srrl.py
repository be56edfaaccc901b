"""SRRL: knowledge distillation via softmax regression representation learning (Yang et al., ICLR 2021).

A transfer layer (1×1 conv = bias-free linear, BatchNorm, ReLU) maps the student's pooled
feature to the teacher's width; it must match the teacher's pooled feature, and the
teacher's own frozen classifier applied to it must reproduce the teacher's logits:

    z = transfer(f_s)
    srrl = mse(z, f_t) + mse(W_t z + b_t, teacher logits)

Reference: DefangChen/SimKD ``models/util.py`` (SRRL), ``helper/loops.py``.
Defaults: β = 1 with CE 1 and KD 1 (T = 4), as SimKD ``scripts/run_distill.sh``
(``-c 1 -d 1 -b 1``). ``ctx.teacher_classifier`` is kept out of the module tree (a tuple),
so it is never optimised.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class SRRL(Distiller):
    """Feature regression plus softmax regression through the teacher's classifier."""

    taps: ClassVar[Taps] = Taps(student=("logits", "pooled"), teacher=("logits", "pooled"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "kd": 1.0, "srrl": 1.0}

    def __init__(self, ctx: MethodContext, T: float = 4.0):
        super().__init__(ctx)
        if ctx.teacher_classifier is None:
            raise ConfigError("srrl needs the teacher's final linear layer (ctx.teacher_classifier)")
        self.T = T
        d_s, d_t = ctx.student_shapes["pooled"][0], ctx.teacher_shapes["pooled"][0]
        self.transfer = nn.Sequential(nn.Linear(d_s, d_t, bias=False), nn.BatchNorm1d(d_t), nn.ReLU())
        self._teacher_fc = (ctx.teacher_classifier,)  # a tuple: not a submodule, not optimised

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.pooled is not None and t.pooled is not None and s.logits is not None and t.logits is not None
        z = self.transfer(s.pooled.flatten(1))
        pred = self._teacher_fc[0](z)
        srrl = F.mse_loss(z, t.pooled.flatten(1)) + F.mse_loss(pred, t.logits)
        return {"srrl": srrl, "kd": kd_loss(s.logits, t.logits, self.T)}
