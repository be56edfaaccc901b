"""Label-smoothing regularisation (Szegedy et al., CVPR 2016): the teacher-free control of Tf-KD.

The reference trains on smoothed targets q = (1 − α) on the label and α / (C − 1) on every
other class: L = −Σ_c q_c log p_c. This splits exactly into the engine's cross-entropy and a
uniform term over the non-target classes,

    L = (1 − α) · CE + α · smooth,    smooth = −mean_b (1 / (C − 1)) Σ_{c ≠ y_b} log p_{b,c}

so kdbench returns ``smooth`` and puts α into the weights: ``{"ce": 1 − α, "smooth": α}``
(change both to change α). Reference: yuanli2333/Teacher-free-Knowledge-Distillation
``my_loss_function.py`` ``loss_label_smoothing``. Default: α = 0.1. No teacher.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def non_target_nll(logits: Tensor, y: Tensor) -> Tensor:
    """−mean_b (1 / (C − 1)) Σ_{c ≠ y_b} log softmax(logits)_{b,c}."""
    logp = F.log_softmax(logits, dim=1)
    c = logits.shape[1]
    return -((logp.sum(1) - logp.gather(1, y[:, None]).squeeze(1)) / (c - 1)).mean()


class LSR(Distiller):
    """Cross-entropy on label-smoothed targets, expressed as CE plus a uniform non-target term."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=())
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.9, "smooth": 0.1}
    requires_teacher: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {"smooth": non_target_nll(s.logits, batch.y)}
