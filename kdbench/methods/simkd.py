"""SimKD: knowledge distillation with the reused teacher classifier (Chen et al., CVPR 2022).

A bottleneck projector (1×1 conv → BN → ReLU → 3×3 conv → BN → ReLU → 1×1 conv → BN →
ReLU, bottleneck width C_t / factor) maps the student's last stage to the teacher's
(the larger map average-pooled to the smaller's size first); the only loss is

    simkd = mse(projector(s_L), t_L)

and the student *predicts* with the teacher's frozen classifier on the pooled projection:
``predict(s) = W_t · avgpool(projector(s_L)) + b_t``, for training metrics and evaluation.

Reference: DefangChen/SimKD ``models/util.py`` (SimKD), ``helper/loops.py``
(train_distill / validate_distill). Defaults: factor = 2, β = 1, and no CE and no KD
(``scripts/run_distill.sh``: ``-c 0 -d 0 -b 1``), hence ``{"ce": 0, "simkd": 1}``.
``ctx.teacher_classifier`` is kept out of the module tree (a tuple), so it is never optimised.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods._blocks import conv1x1, conv3x3, pool_to_smaller
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class SimKD(Distiller):
    """Project the student's last stage onto the teacher's and reuse the teacher's classifier."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.0, "simkd": 1.0}

    def __init__(self, ctx: MethodContext, factor: int = 2):
        super().__init__(ctx)
        if ctx.teacher_classifier is None:
            raise ConfigError("simkd needs the teacher's final linear layer (ctx.teacher_classifier)")
        c_s, h_s, w_s = ctx.student_shapes["stages"][-1]
        c_t, h_t, w_t = ctx.teacher_shapes["stages"][-1]
        mid = c_t // factor
        self.projector = nn.Sequential(
            conv1x1(c_s, mid), nn.BatchNorm2d(mid), nn.ReLU(),
            conv3x3(mid, mid), nn.BatchNorm2d(mid), nn.ReLU(),
            conv1x1(mid, c_t), nn.BatchNorm2d(c_t), nn.ReLU(),
        )  # fmt: skip
        # the student map is pooled to the teacher's size when larger (known from the shapes)
        self.source_size = (h_t, w_t) if h_s > h_t else None
        self._teacher_fc = (ctx.teacher_classifier,)  # a tuple: not a submodule, not optimised

    def project(self, s: Features) -> Tensor:
        """The projected last stage; computed once per student forward (kept in ``s.cache``)."""
        out = s.cache.get("simkd.projection")
        if out is None:
            f = s.stages[-1]
            out = self.projector(
                f if self.source_size is None else F.adaptive_avg_pool2d(f, self.source_size)
            )
            s.cache["simkd.projection"] = out
        return out

    def predict(self, s: Features) -> Tensor:
        return self._teacher_fc[0](self.project(s).mean((2, 3)))

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        proj, target = pool_to_smaller(self.project(s), t.stages[-1])
        return {"simkd": F.mse_loss(proj, target)}
