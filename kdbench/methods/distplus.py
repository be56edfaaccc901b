"""DIST+: knowledge distillation from a stronger adaptive teacher (Huang et al., TPAMI 2025,
doi 10.1109/TPAMI.2025.3554235), the journal version of DIST (NeurIPS 2022).

DIST's relational loss on the class probabilities, plus the same correlation relations on the
last stage's map F (B, C, H, W), with ρ the Pearson correlation of two vectors:

    dist    = τ² · ( β · (1 − mean_b ρ(Y_s[b, :], Y_t[b, :])) + γ · (1 − mean_k ρ(Y_s[:, k], Y_t[:, k])) )
    channel = 1 − mean_{b,h,w} ρ(F_s[b, :, h, w], F_t[b, :, h, w])        (across channels, per position)
    spatial = 1 − mean_{h,w} ρ(S_s[:, h, w], S_t[:, h, w]),  S = Σ_c F   (across the batch, per position)
    distplus = dist + ι · channel + κ · spatial

Y = softmax(z / τ). As in the reference, ρ is ``cosine_similarity`` of the centred vectors (eps
1e-8) for the logit and spatial terms, and ⟨a, b⟩ / (sqrt(‖a‖²‖b‖²) + 1e-8) for the channel term.

Reference: yoshitomo-matsubara/torchdistill (commit 3e4373c; PR #513) ``torchdistill/losses/mid_level.py``
``DISTPlusLoss`` (on ``DISTLoss``), with ``configs/sample/ilsvrc2012/dist_plus/resnet18_from_resnet34.yaml``:
β = γ = 2, ι = κ = 1, τ = 1, term weight 2, CE 1, features = the last stage (``layer4``). No
CIFAR-100 config exists for DIST+, so these are the defaults here too. What differs from that
code, on purpose:

* **channel term sign.** The reference adds ι · mean ρ (the correlation itself, not 1 − ρ), so
  minimising it pushes the student's channels to *anti*-correlate with the teacher's, against
  the paper's relation-preserving loss and its own spatial term, which is 1 − ρ. kdbench uses
  1 − ρ. The golden test checks this term against the reference's ρ as 1 − ρ (gradient negated)
  and every other term unchanged.
* **the teacher acclimation** of the paper (adapting the teacher during distillation) is not in
  the reference and not here: this is DIST+'s loss with a fixed teacher.
* **unequal maps.** The reference needs equal channel counts and map sizes. When the channels
  differ, a 1×1 conv + BatchNorm projects the student's map (trained with the student); when the
  sizes differ, the larger map is average-pooled to the smaller's. Equal maps are used as they are.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods._blocks import conv1x1, pool_to_smaller
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def centred_cosine(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation of matching rows, as torchdistill's DIST: cosine of the centred rows."""
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), eps=eps)


def channel_correlation(f_s: Tensor, f_t: Tensor, eps: float) -> Tensor:
    """Mean over (b, h, w) of the Pearson correlation across channels."""
    a = f_s - f_s.mean(1, keepdim=True)
    b = f_t - f_t.mean(1, keepdim=True)
    den = torch.sqrt((a**2).sum(1) * (b**2).sum(1))
    return ((a * b).sum(1) / (den + eps)).mean()


def spatial_correlation(f_s: Tensor, f_t: Tensor, eps: float) -> Tensor:
    """Mean over positions of the Pearson correlation across the batch of the channel-summed maps."""
    return centred_cosine(f_s.sum(1).flatten(1).T, f_t.sum(1).flatten(1).T, eps).mean()


def dist_logit_loss(z_s: Tensor, z_t: Tensor, beta: float, gamma: float, tau: float, eps: float) -> Tensor:
    """τ² (β (1 − inter-class ρ) + γ (1 − intra-class ρ)) of softmax(z / τ)."""
    y_s, y_t = (z_s / tau).softmax(1), (z_t / tau).softmax(1)
    inter = 1 - centred_cosine(y_s, y_t, eps).mean()
    intra = 1 - centred_cosine(y_s.T, y_t.T, eps).mean()
    return tau**2 * (beta * inter + gamma * intra)


class DISTPlus(Distiller):
    """DIST's class relations on the logits plus channel and spatial relations of the last stage."""

    batch_relational = True

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("logits", "stages"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "distplus": 2.0}

    def __init__(
        self,
        ctx: MethodContext,
        beta: float = 2.0,
        gamma: float = 2.0,
        iota: float = 1.0,
        kappa: float = 1.0,
        tau: float = 1.0,
        eps: float = 1e-8,
    ):
        super().__init__(ctx)
        self.beta, self.gamma, self.iota, self.kappa, self.tau, self.eps = beta, gamma, iota, kappa, tau, eps
        c_s, c_t = ctx.student_shapes["stages"][-1][0], ctx.teacher_shapes["stages"][-1][0]
        self.projector = nn.Sequential(conv1x1(c_s, c_t), nn.BatchNorm2d(c_t)) if c_s != c_t else None

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.logits is not None and t.logits is not None
        f_s = s.stages[-1] if self.projector is None else self.projector(s.stages[-1])
        f_s, f_t = pool_to_smaller(f_s, t.stages[-1])
        loss = dist_logit_loss(s.logits, t.logits, self.beta, self.gamma, self.tau, self.eps)
        loss = loss + self.iota * (1 - channel_correlation(f_s, f_t, self.eps))
        loss = loss + self.kappa * (1 - spatial_correlation(f_s, f_t, self.eps))
        return {"distplus": loss}
