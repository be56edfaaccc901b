"""SRD: the simple recipe of "Understanding the Role of the Projector in Knowledge Distillation"
(Miles & Mikolajczyk, AAAI 2024, arXiv 2303.11098).

A linear projector maps the student's pooled feature to the teacher's width; both are
batch-normalised without affine parameters (batch statistics, eps 1e-4), and the loss is the
log of their L_p^p distance, plus KD on the logits:

    z_s = BN(W f_s + b),   z_t = BN(f_t)                     (BN over the batch, biased variance)
    srd = 2 · log Σ_{b,d} |z_s − z_t|^p  +  KL_batchmean(softmax(l_t / T) ‖ softmax(l_s / T))

with l the logits, p = 4 and T = 1; the KL term has no T² factor, as in the reference.

Reference: yoshitomo-matsubara/torchdistill (commit 3e4373c) ``torchdistill/losses/mid_level.py``
``SRDLoss`` and ``torchdistill/models/wrapper.py`` ``SRDModelWrapper`` (spatial mean of the last
stage, ``Linear`` for the student only, ``BatchNorm1d(eps=1e-4, affine=False)`` for both), as ported
from roymiles/Simple-Recipe-Distillation ``imagenet/torchdistill/losses/single.py``
(``OurDistillationLoss``), whose norm layers are in training mode, as torchdistill's are
during training. kdbench reads the pooled feature (the classifier's input, = the last stage's
spatial mean for the CNNs of the zoo). Defaults: exponent 4, T = 1, srd weight 1, CE 1, from
``configs/official/ilsvrc2012/roymiles/aaai2024/srd-resnet18_from_resnet34.yaml``; neither
repository has a CIFAR-100 config, so these are the CIFAR-100 defaults too.
Neither reference passes the student's feature through the teacher's classifier (that is SRRL /
SimKD); the KL term uses the student's own logits.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def batch_standardize(z: Tensor, eps: float) -> Tensor:
    """BatchNorm1d without affine parameters, in training mode: (z − mean_b) / sqrt(var_b + eps)."""
    return F.batch_norm(z, None, None, training=True, eps=eps)


def srd_loss(
    p_s: Tensor, f_t: Tensor, z_s: Tensor, z_t: Tensor, exponent: float, T: float, eps: float
) -> Tensor:
    """2 · log Σ |BN(p_s) − BN(f_t)|^exponent + KL_batchmean(softmax(z_t/T) ‖ softmax(z_s/T))."""
    diff = (batch_standardize(p_s, eps) - batch_standardize(f_t, eps)).abs()
    feat = torch.log(diff.pow(exponent).sum())
    kl = F.kl_div(F.log_softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1), reduction="batchmean")
    return 2 * feat + kl


class SRD(Distiller):
    """Log L_p distance of batch-normalised projected features, plus KD on the logits."""

    batch_relational = True  # batch statistics: a rank's shard would normalise differently

    taps: ClassVar[Taps] = Taps(student=("logits", "pooled"), teacher=("logits", "pooled"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "srd": 1.0}

    def __init__(self, ctx: MethodContext, exponent: float = 4.0, T: float = 1.0, eps: float = 1e-4):
        super().__init__(ctx)
        self.exponent, self.T, self.eps = exponent, T, eps
        d_s, d_t = ctx.student_shapes["pooled"][0], ctx.teacher_shapes["pooled"][0]
        self.projector = nn.Linear(d_s, d_t)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.pooled is not None and t.pooled is not None and s.logits is not None and t.logits is not None
        p_s = self.projector(s.pooled.flatten(1))
        loss = srd_loss(p_s, t.pooled.flatten(1), s.logits, t.logits, self.exponent, self.T, self.eps)
        return {"srd": loss}
