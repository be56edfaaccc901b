"""AB: knowledge transfer via distillation of activation boundaries (Heo et al., AAAI 2019).

Initialisation stage (``init_epochs``): a connector r_l (identity when the shapes already
match, else RepDistiller's ConvReg without ReLU) maps each residual stage's student
pre-activation onto the teacher's, and the student learns the teacher's activation
boundaries with a margin-m squared hinge:

    ab_l = Σ_{b,c,h,w} [ (r_l(s) + m)² · 1(r_l(s) > −m, t ≤ 0) + (r_l(s) − m)² · 1(r_l(s) ≤ m, t > 0) ]
    ab   = Σ_l w_l · ab_l / B · 3/1000,   w_l = 2^(l − L + 1)  (.25, .5, 1 for three stages)

Distillation stage: RepDistiller's AB run is ``-a 0 -b 1`` and its main loop adds no AB
term, so the second stage is plain cross-entropy. ``forward`` still returns the Hinton KD
term (T = ``T``) with default weight 0, so an AB+KD run is only a weights change.

Reference: HobbitLong/RepDistiller ``distiller_zoo/AB.py`` (ABLoss), ``models/util.py``
(Connector), ``helper/pretrain.py`` (the init stage, which sums the AB terms without the
``-b`` weight, hence β = 1), ``train_student.py`` (init_epochs = 30).

Init-stage parameters: RepDistiller trains the connectors and the student's feature
modules (everything but the classifier). ``init_parameters`` yields all student
parameters plus the connectors: the classifier gets no gradient from the AB loss, so with
gradients reset to ``None`` the optimiser leaves it untouched, as in the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods._blocks import residual_preacts
from kdbench.methods._util import ConvReg
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def ab_boundary_loss(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """Summed margin hinge of one stage: the student's sign should match the teacher's."""
    neg = (source > -margin) & (target <= 0)
    pos = (source <= margin) & (target > 0)
    return ((source + margin) ** 2 * neg + (source - margin) ** 2 * pos).sum()


class AB(Distiller):
    """Activation-boundary initialisation, then cross-entropy (optionally + KD)."""

    taps: ClassVar[Taps] = Taps(
        student=("logits", "stages", "preact"), teacher=("logits", "stages", "preact")
    )
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "kd": 0.0, "ab": 1.0}

    def __init__(self, ctx: MethodContext, init_epochs: int = 30, margin: float = 1.0, T: float = 4.0):
        super().__init__(ctx)
        self.init_epochs = init_epochs
        self.margin = margin
        self.T = T
        s_shapes = residual_preacts(ctx.student_shapes["preact"], len(ctx.student_shapes["stages"]))
        t_shapes = residual_preacts(ctx.teacher_shapes["preact"], len(ctx.teacher_shapes["stages"]))
        self.connectors = nn.ModuleList(
            nn.Identity() if tuple(s) == tuple(t) else ConvReg(s, t, use_relu=False)
            for s, t in zip(s_shapes, t_shapes, strict=False)
        )
        n = len(self.connectors)
        self.stage_weights = [2.0 ** (i - n + 1) for i in range(n)]

    def init_loss(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        g_s = residual_preacts(s.preact, len(s.stages))
        g_t = residual_preacts(t.preact, len(t.stages))
        total = torch.zeros((), dtype=g_s[0].dtype, device=g_s[0].device)
        for w, conn, f_s, f_t in zip(self.stage_weights, self.connectors, g_s, g_t, strict=False):
            total = total + w * ab_boundary_loss(conn(f_s), f_t, self.margin)
        return {"ab": total / g_s[0].shape[0] * 3 / 1000}

    def init_parameters(self, student: nn.Module) -> Iterator[nn.Parameter]:
        yield from student.parameters()
        yield from self.connectors.parameters()

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.logits is not None and t.logits is not None
        return {"kd": kd_loss(s.logits, t.logits, self.T)}
