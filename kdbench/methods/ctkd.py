"""Curriculum temperature for KD (Li et al., AAAI 2023, "Curriculum Temperature for Knowledge
Distillation", arXiv 2211.16231).

KD whose temperature is learned adversarially: a temperature module predicts τ, and a
gradient-reversal layer (GRL) makes it ascend the distillation loss while the student descends it.
With r the module's raw output (a learnable scalar, or one value per sample),

    τ = t_start + t_end · sigmoid(GRL_λ(r))          (τ ∈ (1, 21) with the defaults)
    ctkd = mean_b τ_b² · KL( softmax(z_t,b / τ_b) ‖ softmax(z_s,b / τ_b) )

GRL_λ is the identity forward and multiplies the gradient by −λ backward. λ follows a cosine
curriculum over epochs e = 1, 2, … (the engine's ``batch.epoch`` + 1, as the reference counts):

    λ(e) = λ_end + (λ_start − λ_end) · (1 + cos(π · min(e, E) / E)) / 2

rising from λ_start = 0 to λ_end = 1 over E = 10 epochs, then held.

Modes:

* ``global`` (the published code): one learnable scalar r, initialised to 1 (τ ≈ 15.6 at the
  start), and the batch-mean KL · τ² of ``DistillKL`` (``nn.KLDivLoss(reduction="batchmean")``).
* ``instance``: r per sample from a 2-layer MLP (Linear(2C, ``hidden``), ReLU, Linear(hidden, 1))
  on the concatenated [teacher, student] logits, detached: the temperature module learns through
  the GRL only and the student only through the KL. The paper describes a 2-layer MLP but its
  code is not in the repository; the MLP here is ours. The loss is the README's instance-wise
  ``KL_Loss`` exactly, with its 1e-7 added to the teacher probabilities:
  mean_b τ_b² Σ_c (p_t + 1e-7)(log(p_t + 1e-7) − log softmax(z_s / τ_b)).

``standardize: true`` z-scores both logits per sample before dividing by τ (logit
standardization, Sun et al. 2024; :mod:`kdbench.methods._standardize`), as
``DistillKL_logit_stand`` in sunshangquan/logit-standardization-KD (commit f6e5aa5)
``CTKD/distiller_zoo/KD.py``; its default weights are CE 0.1, ctkd 9 (that repository's
``CTKD/scripts/run_cifar_distill.sh``: ``-r 0.1 -a 9``; its ``--kd_T 2`` is unused with a learned
temperature). Note that repository's ``train_student.py`` picks ``DistillKL_logit_stand`` when
``--logit_stand`` is *absent* (the condition is inverted); its script passes no flag, so its
CTKD+LS numbers come from the standardized loss, which is what ``standardize: true`` computes.

Reference: zhengli97/CTKD (commit 7d52522) ``models/temp_global.py`` (Global_T, the GRL),
``distiller_zoo/KD.py`` (DistillKL), ``helper/loops.py`` (τ = t_start + t_end · sigmoid(·)),
``train_student.py`` (CosineDecay; t_start 1, t_end 20), README (instance-wise KL_Loss).
CIFAR-100 defaults from ``scripts/run_cifar_distill.sh``: ``-r 0.1 -a 0.9 -b 0 --have_mlp 1
--mlp_name global --cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10`` (i.e. CE 0.1,
ctkd 0.9, λ from 0 to 1 over 10 epochs; the reference's decay value is −λ). The temperature
module is optimised with the student (the reference adds it to the student's SGD).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods._standardize import KD_WEIGHT, zscore
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

Mode = Literal["global", "instance"]

#: added to the teacher probabilities by the reference's instance-wise KL_Loss
_INSTANCE_EPS = 1e-7


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times −λ backward (Ganin & Lempitsky's GRL)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def reverse_gradient(x: Tensor, lam: float) -> Tensor:
    """``x`` forward, ``−lam ·`` its gradient backward."""
    return _ReverseGradient.apply(x, lam)


def cosine_curriculum(epoch: int, start: float, end: float, epochs: int) -> float:
    """λ at ``epoch`` (from 1): ``start`` → ``end`` along half a cosine over ``epochs``, then ``end``."""
    e = min(max(epoch, 0), epochs)
    return end + (start - end) * (1.0 + math.cos(math.pi * e / epochs)) / 2.0


def kl_batchmean(z_s: Tensor, z_t: Tensor, T: Tensor) -> Tensor:
    """mean_b KL(softmax(z_t / T) ‖ softmax(z_s / T)) · T² for a one-element tensor T."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    log_p_t = F.log_softmax(z_t / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    return kl * T.reshape(()) ** 2


def kl_per_instance(z_s: Tensor, z_t: Tensor, T: Tensor) -> Tensor:
    """mean_b T_b² Σ_c q (log q − log softmax(z_s / T_b)), q = softmax(z_t / T_b) + 1e-7; T is (B, 1)."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    q = F.softmax(z_t / T, dim=1) + _INSTANCE_EPS
    return (T[:, 0] ** 2 * (q * (q.log() - log_p_s)).sum(1)).mean()


class CTKD(Distiller):
    """KD with an adversarially learned temperature on a cosine curriculum (see module docstring)."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.1, "ctkd": 0.9}

    @classmethod
    def weights_for(cls, standardize: bool = False, **_params: Any) -> dict[str, float]:
        return {"ce": 0.1, "ctkd": KD_WEIGHT} if standardize else dict(cls.default_weights)

    def __init__(
        self,
        ctx: MethodContext,
        mode: Mode = "global",
        t_start: float = 1.0,
        t_end: float = 20.0,
        lambda_start: float = 0.0,
        lambda_end: float = 1.0,
        lambda_epochs: int = 10,
        hidden: int = 128,
        standardize: bool = False,
    ):
        super().__init__(ctx)
        if mode not in ("global", "instance"):
            raise ConfigError(f"ctkd: mode must be 'global' or 'instance', got {mode!r}")
        if lambda_epochs < 1:
            raise ConfigError(f"ctkd: lambda_epochs must be at least 1, got {lambda_epochs}")
        self.mode = mode
        self.t_start, self.t_end = t_start, t_end
        self.lambda_start, self.lambda_end, self.lambda_epochs = lambda_start, lambda_end, lambda_epochs
        self.standardize = standardize
        if mode == "global":
            self.global_T = nn.Parameter(torch.ones(1))
        else:
            c = ctx.num_classes
            self.mlp = nn.Sequential(nn.Linear(2 * c, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self._last_T: Tensor | None = None

    def reversal(self, batch: Batch) -> float:
        """λ of this batch's epoch."""
        return cosine_curriculum(batch.epoch + 1, self.lambda_start, self.lambda_end, self.lambda_epochs)

    def temperature(self, z_s: Tensor, z_t: Tensor, lam: float) -> Tensor:
        """τ: shape (1,) in global mode, (B, 1) in instance mode; reversed gradient to the module."""
        if self.mode == "global":
            raw = self.global_T
        else:
            x = torch.cat([z_t.detach(), z_s.detach()], dim=1).to(self.mlp[0].weight.dtype)
            raw = self.mlp(x)
        return self.t_start + self.t_end * torch.sigmoid(reverse_gradient(raw, lam))

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        # half-precision logits (autocast) are computed in float32, like the fused KD kernels
        dtype = torch.promote_types(s.logits.dtype, torch.float32)
        z_s, z_t = s.logits.to(dtype), t.logits.detach().to(dtype)
        T = self.temperature(z_s, z_t, self.reversal(batch)).to(dtype)
        self._last_T = T.detach()
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        loss = kl_batchmean(z_s, z_t, T) if self.mode == "global" else kl_per_instance(z_s, z_t, T)
        return {"ctkd": loss}

    def summary(self) -> dict[str, Any]:
        """The temperature of the last training batch (its mean in instance mode)."""
        if self._last_T is None:
            return {}
        return {"temperature": float(self._last_T.float().mean())}
