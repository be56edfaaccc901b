"""ReviewKD: distilling knowledge via knowledge review (Chen et al., CVPR 2021).

The student's residual stages and pooled feature, x_1..x_L = ``stages[1:] + [pooled]``,
are fused deep-to-shallow by attention-based fusion (ABF) modules: level l maps x_l to a
mid width by 1×1 conv + BN, mixes it with the upsampled (nearest) fused map of the deeper
level through a 2-channel sigmoid attention (1×1 conv), resizes it to the teacher's map
size, and outputs conv3×3 + BN with the teacher's channels. Hierarchical context loss
against the teacher's ``stages[1:] + [pooled]``:

    hcl(a, b) = [ mse(a, b) + Σ_{k ∈ {4,2,1}, k < H} 2^−i · mse(pool_k(a), pool_k(b)) ] / (1 + Σ 2^−i)
    reviewkd  = min(epoch / warmup, 1) · Σ_l hcl(ABF_l, t_l)

Reference: megvii-research/mdistiller ``mdistiller/distillers/ReviewKD.py`` (ABF, hcl_loss)
and its CIFAR configs. Defaults: mid width min(512, C of the student's pooled feature),
weight 1, CE weight 1, warm-up 20 epochs (the ramp is applied inside the term).
Deviation: mdistiller feeds the teacher's *pre-activation* stages; kdbench reads the
post-activation ``stages`` so that ReviewKD runs on any model, including those without
pre-activation taps.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps, warmup_factor


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused deeper level."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None and deeper is not None:
            deeper = F.interpolate(deeper, x.shape[2:], mode="nearest")
            z = self.att_conv(torch.cat([x, deeper], 1))
            x = x * z[:, :1] + deeper * z[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def hcl_loss(fs: list[Tensor], ft: list[Tensor], levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """Hierarchical context loss: MSE plus MSE of pyramid-pooled maps, halving weights."""
    total = 0.0
    for a, b in zip(fs, ft, strict=False):
        loss = F.mse_loss(a, b)
        cnt, tot = 1.0, 1.0
        for k in levels:
            if k >= a.shape[2]:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(a, k), F.adaptive_avg_pool2d(b, k)) * cnt
            tot += cnt
        total = total + loss / tot
    return total  # type: ignore[return-value]


def _as_map(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (shape[0], 1, 1) if len(shape) == 1 else (shape[0], shape[1], shape[2])


class ReviewKD(Distiller):
    """Review mechanism: fused student levels regress all teacher levels (HCL loss)."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages", "pooled"), teacher=("stages", "pooled"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "reviewkd": 1.0}

    def __init__(self, ctx: MethodContext, warmup: float = 20.0, max_mid_channel: int = 512):
        super().__init__(ctx)
        self.warmup = warmup
        s = [_as_map(x) for x in [*ctx.student_shapes["stages"][1:], ctx.student_shapes["pooled"]]]
        t = [_as_map(x) for x in [*ctx.teacher_shapes["stages"][1:], ctx.teacher_shapes["pooled"]]]
        c_mid = min(max_mid_channel, s[-1][0])
        # abfs[i] handles level i counted from the deepest (the pooled feature, never fused)
        self.abfs = nn.ModuleList(
            ABF(s_l[0], c_mid, t_l[0], fuse=i > 0)
            for i, (s_l, t_l) in enumerate(zip(s[::-1], t[::-1], strict=False))
        )
        self.out_sizes = [(t_l[1], t_l[2]) for t_l in t[::-1]]

    @staticmethod
    def _levels(f: Features) -> list[Tensor]:
        assert f.pooled is not None
        return [*f.stages[1:], f.pooled.flatten(1)[:, :, None, None]]

    def fuse(self, s: Features) -> list[Tensor]:
        """The student's fused outputs, shallow to deep."""
        x = self._levels(s)[::-1]
        out, res = self.abfs[0](x[0], None, self.out_sizes[0])
        results = [out]
        for x_l, abf, size in zip(x[1:], self.abfs[1:], self.out_sizes[1:], strict=False):
            out, res = abf(x_l, res, size)
            results.insert(0, out)
        return results

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        loss = hcl_loss(self.fuse(s), self._levels(t))
        return {"reviewkd": warmup_factor(batch, self.warmup) * loss}
