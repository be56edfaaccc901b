"""The tolerant teacher (Yang, Xie, Qiao, Yuille: "Training Deep Neural Networks in Generations:
A More Tolerant Teacher Educates Better Students", AAAI 2019).

A teacher trained only on one-hot targets becomes over-confident; the paper adds a term that
keeps a few secondary classes alive. With scores s (logits) sorted so that a_1 is the highest
scoring class and a_2..a_K the next K−1,

    tolerant = s_{a_1} − 1/(K−1) · Σ_{k=2..K} s_{a_k}        (the top-score difference)

and the teacher minimises CE + η · tolerant: the gap between the primary score and the mean of
the top-K other scores shrinks, so the softmax is less peaked. Our choices: the term is
averaged over the batch; defaults K = 5 and η = 0.6 are ours, to be tuned per dataset (the paper
tunes η). Used as a teacher recipe's method: ``teacher_train: {method: {tolerant: {eta: 0.6}}}``;
it is a ``kdbench.losses`` plugin that needs no teacher, so it can also train a student alone.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def top_score_difference(logits: Tensor, k: int = 5) -> Tensor:
    """Batch mean of s_{a_1} − mean(s_{a_2..a_K}) over the K highest logits of each row."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).values
    return (top[:, 0] - top[:, 1:].mean(1)).mean()


class Tolerant(Distiller):
    """Cross-entropy plus η times the top-score difference (no teacher needed)."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=())
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "tolerant": 1.0}
    requires_teacher: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext, eta: float = 0.6, k: int = 5):
        super().__init__(ctx)
        if k < 2:
            raise ConfigError(f"tolerant: k must be at least 2 (the primary class and one other), got {k}")
        self.eta, self.k = float(eta), int(k)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {"tolerant": self.eta * top_score_difference(s.logits, self.k)}
