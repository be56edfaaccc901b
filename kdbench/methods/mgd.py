"""MGD: masked generative distillation (Yang et al., ECCV 2022, arXiv 2205.01529).

The student's feature map is aligned to the teacher's channels (a 1×1 convolution, with bias,
only when the channel counts differ), randomly masked, and a generation block G (3×3 conv,
ReLU, 3×3 conv, with biases) must recover the teacher's whole feature map from it:

    mgd = Σ (G(M ⊙ align(f_s)) − f_t)² / N,    f = stages[layer], N the batch size

weighted α (the reference multiplies by ``alpha_mgd`` inside the loss; kdbench puts α in the
term's weight). The mask M is redrawn every step. ``mask="channel"`` is the classification code's:
M[n, c] = 0 where u[n, c] < λ, u ~ U(0, 1) of shape (N, C_t, 1, 1), i.e. a fraction λ of the
channels dropped per sample. ``mask="spatial"`` is the detection / segmentation code's (and the
paper's figure): M[n, h, w] = 0 where u[n, h, w] > 1 − λ, u of shape (N, 1, H, W).

The uniform draw is made as the reference makes it, ``torch.rand`` on the CPU in the default
dtype, then moved to the features' device, so a given seed masks the same entries on any
device. It comes from torch's default generator, which kdbench's engine seeds per cell,
checkpoints with the cell (and swaps per cell in a lockstep group): a cell is reproducible and
resumes with the same masks. Tests and callers may pass their own ``generator`` to
:meth:`MGD.draw_mask`, or a fixed mask to :meth:`MGD.loss`.

Reference: yzd-v/MGD (commit 2c9da0b) ``cls/mmcls/distillation/losses/mgd.py`` (MGDLoss,
channel mask) and ``det/mmdet/distillation/losses/mgd.py`` (FeatureLoss, spatial mask); the
classification distiller (``cls/mmcls/distillation/distillers/classification_distiller.py``)
distils the last backbone stage and adds the student's CE with weight 1. CIFAR-100 defaults
from the same authors' yzd-v/cls_KD (commit 1e5d48f, whose ``mmcls/models/dis_losses/mgd.py`` is
the same loss) ``configs/distillers/cifar100/res34_distill_res18_cifar.py``: α = 0.0012,
λ = 0.15 on the last stage (the ImageNet configs of yzd-v/MGD use α = 7e-5, λ = 0.15).

Deviation, only where the reference is undefined: it asserts that the two maps have the same
spatial size; for pairs where they differ (cross-family CIFAR pairs such as resnet32x4 → ShuffleV2)
kdbench average-pools the larger map to the smaller's size first, as it does for AT and NST.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods._util import match_spatial
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

MaskKind = Literal["channel", "spatial"]


class MGD(Distiller):
    """A generation block recovers the teacher's feature map from the randomly masked student map."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "mgd": 0.0012}

    def __init__(
        self, ctx: MethodContext, layer: int = -1, mask_ratio: float = 0.15, mask: MaskKind = "channel"
    ):
        super().__init__(ctx)
        if mask not in ("channel", "spatial"):
            raise ConfigError(f"mgd: mask must be 'channel' or 'spatial', got {mask!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mgd: mask_ratio is the masked fraction, in [0, 1); got {mask_ratio}")
        s_shape, t_shape = ctx.stage_maps(layer, "mgd")
        self.layer, self.mask_ratio, self.mask = layer, mask_ratio, mask
        c_s, c_t = s_shape[0], t_shape[0]
        self.align: nn.Module | None = nn.Conv2d(c_s, c_t, kernel_size=1) if c_s != c_t else None
        self.generation = nn.Sequential(
            nn.Conv2d(c_t, c_t, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_t, c_t, kernel_size=3, padding=1),
        )

    def draw_mask(self, f_t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A fresh 0/1 mask for a batch of teacher maps (N, C, H, W), broadcastable to them."""
        n, c, h, w = f_t.shape
        if self.mask == "channel":
            keep = torch.rand((n, c, 1, 1), generator=generator) >= self.mask_ratio
        else:
            keep = torch.rand((n, 1, h, w), generator=generator) <= 1 - self.mask_ratio
        return keep.to(device=f_t.device, dtype=f_t.dtype)

    def loss(self, f_s: Tensor, f_t: Tensor, mask: Tensor) -> Tensor:
        """Σ (G(mask ⊙ align(f_s)) − f_t)² / N, unweighted."""
        if self.align is not None:
            f_s = self.align(f_s)
        generated = self.generation(f_s * mask)
        return (generated - f_t).pow(2).sum() / f_s.shape[0]

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        f_s, f_t = match_spatial(s.stages[self.layer], t.stages[self.layer])
        return {"mgd": self.loss(f_s, f_t, self.draw_mask(f_t))}
