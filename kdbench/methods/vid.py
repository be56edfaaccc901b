"""VID: Variational Information Distillation (Ahn et al., CVPR 2019).

For every residual stage l (``stages[1:]``, RepDistiller's ``feat[1:-1]``) a regressor μ_l
(1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv, mid width = teacher channels) predicts the
teacher map from the student map, with a learned per-channel variance
σ²_c = softplus(α_c) + ε:

    vid = Σ_l mean_{b,c,h,w} ½ [ (μ_l(f_s) − f_t)² / σ²_c + log σ²_c ]

The larger of the two maps is average-pooled to the smaller's size first.

Reference: HobbitLong/RepDistiller ``distiller_zoo/VID.py`` (from the authors' code).
Defaults: init_pred_var = 5 (α initialised so that σ² = 5), eps = 1e-5, β = 1, CE weight 1
(RepDistiller ``scripts/run_cifar_distill.sh``: ``-a 0 -b 1``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods._blocks import conv1x1, pool_to_smaller
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class VIDRegressor(nn.Module):
    """Mean predictor and learned variance of one stage."""

    def __init__(self, c_s: int, c_mid: int, c_t: int, init_pred_var: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(
            conv1x1(c_s, c_mid), nn.ReLU(), conv1x1(c_mid, c_mid), nn.ReLU(), conv1x1(c_mid, c_t)
        )
        # inverse softplus, so that the initial variance is init_pred_var
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        mu = self.mean(f_s)
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mu - f_t) ** 2 / var + var.log())).mean()


class VID(Distiller):
    """Gaussian log-likelihood of the teacher's stages given the student's."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "vid": 1.0}

    def __init__(self, ctx: MethodContext, init_pred_var: float = 5.0, eps: float = 1e-5):
        super().__init__(ctx)
        s_shapes = ctx.student_shapes["stages"][1:]
        t_shapes = ctx.teacher_shapes["stages"][1:]
        self.regressors = nn.ModuleList(
            VIDRegressor(s[0], t[0], t[0], init_pred_var, eps)
            for s, t in zip(s_shapes, t_shapes, strict=False)
        )

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        pairs = zip(s.stages[1:], t.stages[1:], self.regressors, strict=False)
        return {"vid": sum(reg(f_s, f_t) for f_s, f_t, reg in pairs)}
