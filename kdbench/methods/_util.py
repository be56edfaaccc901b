"""Small building blocks shared by several methods (keep this API stable)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError


class ConvReg(nn.Module):
    """RepDistiller's convolutional regressor: student map (C_s, H_s, W_s) -> teacher's (C_t, H_t, W_t).

    Shapes are per sample. Spatial mismatch is handled as RepDistiller ``models/util.py``
    ConvReg does: H_s = 2·H_t -> 3×3 stride-2 conv; 2·H_s = H_t -> 4×4 stride-2 transposed
    conv; H_s ≥ H_t -> valid conv of kernel (1 + H_s − H_t, 1 + W_s − W_t). Then BatchNorm and
    (if ``use_relu``) ReLU.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        s_c, s_h, s_w = s_shape[-3:]
        t_c, t_h, t_w = t_shape[-3:]
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ConfigError(
                f"cannot regress a student map of size {s_h}x{s_w} onto a teacher map of size {t_h}x{t_w}; "
                "pick a stage where the student map is at least as large (or exactly half as large)"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """x / ‖x‖₂ along ``dim`` without an epsilon (RepDistiller's ``Normalize(2)``)."""
    return x / x.pow(2).sum(dim, keepdim=True).sqrt()


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps down to the other's (H, W), as RepDistiller's AT / NST do."""
    hs, ht = f_s.shape[2:], f_t.shape[2:]
    if hs == ht:
        return f_s, f_t
    if hs[0] > ht[0]:
        return F.adaptive_avg_pool2d(f_s, tuple(ht)), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, tuple(hs))


def check_same_stage_count(method: str, ctx_student_shapes: dict, ctx_teacher_shapes: dict) -> None:
    """Stage-wise methods pair student and teacher stages one to one; say so when they cannot."""
    n_s = len(ctx_student_shapes.get("stages") or [])
    n_t = len(ctx_teacher_shapes.get("stages") or [])
    if n_s != n_t:
        raise ConfigError(
            f"{method} pairs stages one to one, but the student has {n_s} stages and the teacher {n_t}; "
            "choose a pair with the same number of stages or name matching stage taps in the grid"
        )
