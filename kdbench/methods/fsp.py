"""FSP: a gift from knowledge distillation (Yim et al., CVPR 2017).

The "flow of solution procedure" between consecutive stages l, l+1 of a model is the
Gram of their channels over space (the larger map average-pooled to the smaller's size):

    G_l[b, i, j] = mean_{hw} f_{l+1}[b, i, hw] · f_l[b, j, hw]
    fsp = Σ_l mean (G_l^s − G_l^t)²

over all stages including the stem (RepDistiller's ``feat[:-1]``), so the student and the
teacher need the same number of stages and equal channels stage by stage.

As in RepDistiller the FSP loss is an initialisation stage (``init_epochs``, training the
student's feature layers); the distillation stage is plain cross-entropy (``forward``
returns no term). ``helper/pretrain.py`` sums the FSP terms without the script's
``-b 50``, so the init weight is 1.

Reference: HobbitLong/RepDistiller ``distiller_zoo/FSP.py``, ``helper/pretrain.py``,
``train_student.py`` (init_epochs = 30). ``init_parameters`` yields all student parameters:
the classifier gets no gradient from the FSP loss, so it is left as the reference leaves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods._blocks import pool_to_smaller
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def fsp_matrices(stages: list[Tensor]) -> list[Tensor]:
    """[B, C_{l+1}, C_l] FSP matrix of every consecutive pair of stages."""
    out = []
    for bot, top in zip(stages[:-1], stages[1:], strict=False):
        bot, top = pool_to_smaller(bot, top)
        out.append(top.flatten(2) @ bot.flatten(2).transpose(1, 2) / bot[0, 0].numel())
    return out


class FSP(Distiller):
    """Match the student's stage-to-stage FSP matrices to the teacher's (init stage only)."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "fsp": 1.0}

    def __init__(self, ctx: MethodContext, init_epochs: int = 30):
        super().__init__(ctx)
        self.init_epochs = init_epochs
        s_shapes = [tuple(x) for x in ctx.student_shapes["stages"]]
        t_shapes = [tuple(x) for x in ctx.teacher_shapes["stages"]]
        s_c = [x[0] for x in s_shapes]
        t_c = [x[0] for x in t_shapes]
        if s_c != t_c:
            raise ConfigError(
                f"fsp needs the student and the teacher to have the same number of stages with equal "
                f"channels stage by stage; student stages (C, H, W) = {s_shapes}, teacher = {t_shapes}. "
                "Pick a pair of the same width per stage (e.g. resnet20 -> resnet56) or another method."
            )

    def init_loss(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        pairs = zip(fsp_matrices(s.stages), fsp_matrices(t.stages), strict=False)
        return {"fsp": sum(F.mse_loss(g_s, g_t) for g_s, g_t in pairs)}

    def init_parameters(self, student: nn.Module) -> Iterator[nn.Parameter]:
        yield from student.parameters()

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {}
