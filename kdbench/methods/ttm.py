"""Transformed teacher matching (Zheng & Yang, ICLR 2024, "Knowledge Distillation Based on
Transformed Teacher Matching", arXiv 2402.11148).

KD with the temperature dropped on the student side: the teacher's probabilities are raised to
the power γ = 1/T and renormalised, the student is matched at T = 1, and there is no T² factor:

    q = p_t^γ / Σ_c p_t^γ = softmax(γ · z_t)
    ttm = mean_b KL( q_b ‖ softmax(z_s,b) )

(q is computed as softmax(γ · z_t), the same distribution without the power of a probability.)

Reference: zkxufo/TTM (commit fe457b3) ``distiller_zoo/ttm.py`` (class TTM: ``kl_div(...,
reduction='none')`` summed over classes, then the batch mean). CIFAR-100 defaults from the
README's example command (vgg13→vgg8): ``--distill ttm --ttm_l 0.1 -r 1 -b 45 -a 0``, i.e.
γ = 0.1, CE weight 1, ttm weight 45 (``train_student.py`` defaults ``--ttm_l 1``, which is plain
KD at T = 1; the paper's appendix A.4 lists per-pair values).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def transformed_teacher_kl(z_s: Tensor, z_t: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-sample KL(softmax(γ z_t) ‖ softmax(z_s)) and the power sums Σ_c softmax(z_t)^γ."""
    log_p_t = F.log_softmax(z_t, dim=1)
    log_power_sum = (gamma * log_p_t).logsumexp(dim=1)
    log_q = gamma * log_p_t - log_power_sum[:, None]
    kl = (log_q.exp() * (log_q - F.log_softmax(z_s, dim=1))).sum(1)
    return kl, log_power_sum.exp()


class TTM(Distiller):
    """KL from the power-transformed teacher distribution to the student's at T = 1."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "ttm": 45.0}

    def __init__(self, ctx: MethodContext, gamma: float = 0.1):
        super().__init__(ctx)
        self.gamma = gamma

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        kl, _ = transformed_teacher_kl(s.logits, t.logits.detach(), self.gamma)
        return {"ttm": kl.mean()}
