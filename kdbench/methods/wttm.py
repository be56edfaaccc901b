"""Weighted transformed teacher matching (Zheng & Yang, ICLR 2024, "Knowledge Distillation Based
on Transformed Teacher Matching", arXiv 2402.11148).

TTM (:mod:`kdbench.methods.ttm`) with a per-sample weight, the power sum of the teacher's
probabilities, which is larger for smoother teacher predictions:

    w_b = Σ_c p_t,b^γ = exp((1 − γ) · H_γ(p_t,b))      (H_γ the Rényi entropy of order γ)
    wttm = mean_b w_b · KL( softmax(γ · z_t,b) ‖ softmax(z_s,b) )

The weight is not normalised over the batch, exactly as the reference.

Reference: zkxufo/TTM (commit fe457b3) ``distiller_zoo/wttm.py`` (class WTTM: ``mean(norm * KL)``
with ``norm`` the un-normalised power sum). CIFAR-100 defaults: γ = 0.2 and weight 4, the
README's only WTTM command (``--add wttm --ttm_l 0.2 -a 4``, there added to CRD); CE weight 1
(``-r`` default). The paper's appendix A.4 lists per-pair values.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps
from kdbench.methods.ttm import transformed_teacher_kl


class WTTM(Distiller):
    """TTM with each sample weighted by the power sum of its teacher probabilities."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "wttm": 4.0}

    def __init__(self, ctx: MethodContext, gamma: float = 0.2):
        super().__init__(ctx)
        self.gamma = gamma

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        kl, power_sum = transformed_teacher_kl(s.logits, t.logits.detach(), self.gamma)
        return {"wttm": (power_sum * kl).mean()}
