"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015).

    hint = mean( (r(f_s) − f_t)² ),   f = stages[hint_layer]

``r`` is RepDistiller's ConvReg regressor, trained with the student: a convolution mapping
the student's channels to the teacher's and fixing the spatial size (stride-2 3×3 conv when
the student map is twice as large, stride-2 4×4 transposed conv when half as large, a
valid conv of kernel 1 + H_s − H_t otherwise), then BatchNorm and ReLU.

Reference: HobbitLong/RepDistiller ``distiller_zoo/FitNet.py`` (HintLoss = MSE) and
``models/util.py`` (ConvReg). Defaults: hint_layer = 2 (RepDistiller's ``feat[2]`` ==
kdbench ``stages[2]``), β = 100, CE weight 1. As in RepDistiller, the paper's separate
stage-1 hint pre-training is not done; the hint is a term of the joint loss.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods._util import ConvReg
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class FitNet(Distiller):
    """MSE between a regressed student stage and the same teacher stage."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "hint": 100.0}

    def __init__(self, ctx: MethodContext, hint_layer: int = 2):
        super().__init__(ctx)
        self.hint_layer = hint_layer
        s_shape = ctx.student_shapes["stages"][hint_layer]
        t_shape = ctx.teacher_shapes["stages"][hint_layer]
        self.regressor: nn.Module = ConvReg(s_shape, t_shape)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        f_s = self.regressor(s.stages[self.hint_layer])
        return {"hint": F.mse_loss(f_s, t.stages[self.hint_layer])}
