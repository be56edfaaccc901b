"""SDD: scale decoupled distillation (Wei et al., CVPR 2024, arXiv 2403.13512).

The map each model's classifier pools (its last block) is average-pooled at several scales
(1×1, 2×2, 4×4 regions; the 2×2 and 1×1 maps are pooled from the 4×4 one) and every region's
feature goes through that
model's own classifier, giving N region logits per image (N = 1 + 4 + 16 for scales (1, 2, 4)).
KD is applied region by region; a region whose teacher prediction is right while the global one
is wrong, or the other way round, is *complementary* and weighted 2, the others 1:

    kl[n, b] = T² · KL(softmax(z_t[n, b] / T) ‖ softmax(z_s[n, b] / T))
    w[n, b]  = 2 if [argmax z_t[n, b] = y_b] ≠ [argmax z_t[0, b] = y_b] else 1   (n = 0: the global region)
    sdd      = Σ_{n, b} w[n, b] · kl[n, b] / (N · B)

Reference: shicaiwei123/SDD-CVPR2024 (commit e412036) ``mdistiller/distillers/KD.py``
(``sdd_kd_loss``, ``SDD_KD``), ``mdistiller/models/cifar/utils.py`` (``SPP``) and the region logits
of ``mdistiller/models/cifar/resnet.py`` ``ResNet_SDD.forward``. This is SD-KD; the repository's
SD-DKD and SD-NKD variants are not included. Defaults are the authors' CIFAR-100 ones: T = 4,
CE 0.1, sdd 0.9 (``mdistiller/engine/cfg.py`` KD section, not overridden by
``configs/cifar100/sdd_kd/*.yaml``) and scales (1, 2, 4) (``--M [1,2,4]`` in
``teacher_resnet32x4.sh`` etc.; the same scripts use ``[1,2]`` for resnet32x4→resnet8x4 and
vgg13→vgg8). Scales (1,) is plain KD on the logits, as the reference's ``M == '[1]'`` branch.

The student's classifier (``ctx.student_classifier``) is trained with the student; the teacher's
is frozen. Neither is a submodule of the method. The reference zeroes NaN entries of the KL; with
finite logits there are none, so that step is left out.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

SCALES = (1, 2, 4)


def region_features(f: Tensor, scales: tuple[int, ...]) -> Tensor:
    """Region-pooled features of a map (B, C, H, W) as (N, B, C), the global region first.

    As the reference's SPP: the map is pooled to 4×4 and the 2×2 and 1×1 regions from that.
    """
    x4 = F.adaptive_avg_pool2d(f, 4)
    pooled = {1: F.adaptive_avg_pool2d(x4, 1), 2: F.adaptive_avg_pool2d(x4, 2), 4: x4}
    return torch.cat([pooled[m].flatten(2) for m in scales], dim=2).permute(2, 0, 1)


def sdd_kd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, T: float) -> Tensor:
    """Region-wise KD with complementary regions weighted 2; z_s, z_t: (N, B, K), region 0 global."""
    log_p_s = F.log_softmax(z_s / T, dim=-1)
    log_p_t = F.log_softmax(z_t / T, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * T**2  # (N, B)
    right = z_t.argmax(-1) == y  # the teacher's prediction in each region
    weight = 1.0 + (right != right[:1]).to(kl.dtype)
    return (kl * weight).sum() / kl.numel()


class SDD(Distiller):
    """Multi-scale region logits through each model's classifier; complementary regions weighted 2."""

    # ``blocks[-1]`` is the map the classifier pools (after ShuffleNetV2's final 1×1 conv, where the
    # reference applies its SPP); a model without block taps offers its stages as blocks
    taps: ClassVar[Taps] = Taps(student=("logits", "blocks"), teacher=("logits", "blocks"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.1, "sdd": 0.9}

    def __init__(self, ctx: MethodContext, T: float = 4.0, scales: tuple[int, ...] = SCALES):
        super().__init__(ctx)
        scales = tuple(scales)
        if not scales or scales[0] != 1 or list(scales) != sorted(set(scales)) or set(scales) - set(SCALES):
            raise ConfigError(
                f"sdd scales must be increasing, start with 1 and come from {SCALES} "
                f"(the authors use (1, 2, 4) or (1, 2)); got {scales}"
            )
        if ctx.student_classifier is None or ctx.teacher_classifier is None:
            raise ConfigError(
                "sdd applies each model's final linear layer to its region features; name the "
                "classifier of both models in the grid (model params `taps: {classifier: path}`)"
            )
        for who, shapes, fc in (
            ("student", ctx.student_shapes, ctx.student_classifier),
            ("teacher", ctx.teacher_shapes, ctx.teacher_classifier),
        ):
            maps = shapes.get("blocks") or shapes.get("stages")
            c_stage = maps[-1][0] if maps else None
            c_fc = getattr(fc, "in_features", None)
            if c_stage is not None and c_fc is not None and c_stage != c_fc:
                raise ConfigError(
                    f"sdd: the {who}'s last block has {c_stage} channels but its classifier takes "
                    f"{c_fc}; the last block tap must be the map the classifier's pooling reads"
                )
        self.T = T
        self.scales = scales
        # tuples: not submodules (the student's classifier is optimised with the student)
        self._fc = (ctx.student_classifier, ctx.teacher_classifier)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.logits is not None and t.logits is not None
        if self.scales == (1,):
            return {"sdd": kd_loss(s.logits, t.logits, self.T)}
        fc_s, fc_t = self._fc
        z_s = _apply(fc_s, region_features(_last_map(s), self.scales))
        with torch.no_grad():
            z_t = _apply(fc_t, region_features(_last_map(t), self.scales))
        return {"sdd": sdd_kd_loss(z_s, z_t, batch.y, self.T)}


def _last_map(f: Features) -> Tensor:
    """The map the classifier pools: the last block (the last stage when no blocks are given)."""
    return f.blocks[-1] if f.blocks else f.stages[-1]


def _apply(fc: nn.Module, r: Tensor) -> Tensor:
    n, b, c = r.shape
    return fc(r.reshape(n * b, c)).reshape(n, b, -1)
