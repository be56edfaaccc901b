"""Logit regression: the student matches the teacher's logits under squared error.

Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014. The loss is
mean over the batch of ||z_s − z_t||² / C (C = number of classes), added to the student's
cross-entropy with weight ``default_weights["logit_mse"]``.

This package is an example of a third-party kdbench method: one class implementing the
``kdbench.methods.base.Distiller`` contract plus one entry point in ``pyproject.toml``.
"""

from __future__ import annotations

from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


class LogitMSE(Distiller):
    """Squared error between student and teacher logits; ``center`` removes each row's mean first."""

    taps = Taps(student=("logits",), teacher=("logits",))
    default_weights = {"ce": 1.0, "logit_mse": 1.0}

    def __init__(self, ctx: MethodContext, center: bool = True):
        super().__init__(ctx)
        self.center = center

    def forward(self, s, t, batch: Batch):
        zs, zt = s.logits, t.logits
        if self.center:  # logits are defined up to a per-row constant
            zs = zs - zs.mean(1, keepdim=True)
            zt = zt - zt.mean(1, keepdim=True)
        return {"logit_mse": (zs - zt).pow(2).mean()}
