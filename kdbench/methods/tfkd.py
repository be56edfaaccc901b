"""Teacher-free KD (Yuan et al., CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing").

Two modes, one registered name ``tfkd``:

* ``virtual`` (Tf-KD_reg, the default): a hand-made "virtual teacher" puts ``correct_prob``
  on the label and spreads the rest uniformly; its distribution is q = softmax(u / T) and
  ``tfkd = multiplier · mean_{b,c} q (log q − log softmax(z_s))`` (no temperature on the
  student, as in the reference). No teacher model is used.
* ``self`` (Tf-KD_self): the teacher slot holds a pretrained copy of the student, and
  ``tfkd = multiplier · T² · mean_{b,c} p_t (log p_t − log softmax(z_s / T))``, p_t = softmax(z_t / T).

Both average the KL over all B × C entries (``nn.KLDivLoss()``'s element mean), as the
reference does. The reference's total ``(1 − α) · CE + α · KL·…`` maps onto kdbench's weights
as ``{"ce": 1 − α, "tfkd": α}``, so the weighted total equals the reference total exactly.
Defaults per mode (the authors' CIFAR-100 settings): virtual α = 0.1, T = 20, multiplier 100,
correct_prob 0.99; self α = 0.95, T = 6, multiplier 50. ``T`` / ``multiplier`` left as None take
the mode's default; α lives in the weights (change ``ce`` and ``tfkd`` together).

Because the teacher, the teacher taps and the default weights depend on ``mode``, the class
attributes describe the default (virtual) mode and the classmethods ``needs_teacher``,
``taps_for`` and ``weights_for`` answer for given parameters (the engine asks them).
Reference: yuanli2333/Teacher-free-Knowledge-Distillation ``my_loss_function.py``
(``loss_kd_regularization``, ``loss_kd_self``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

Mode = Literal["self", "virtual"]

#: mode -> (alpha, T, multiplier)
_MODE_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "virtual": (0.1, 20.0, 100.0),
    "self": (0.95, 6.0, 50.0),
}


def elementwise_kl(log_p_s: Tensor, p_t: Tensor) -> Tensor:
    """mean over every (b, c) entry of p_t (log p_t − log p_s) (``nn.KLDivLoss()`` default)."""
    return (torch.xlogy(p_t, p_t) - p_t * log_p_s).mean()


class TfKD(Distiller):
    """Teacher-free KD with a virtual teacher or a self-teacher (see module docstring)."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=())
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.9, "tfkd": 0.1}
    requires_teacher: ClassVar[bool] = False

    @classmethod
    def needs_teacher(cls, mode: Mode = "virtual", **_params: Any) -> bool:
        return mode == "self"

    @classmethod
    def taps_for(cls, mode: Mode = "virtual", **_params: Any) -> Taps:
        return Taps(student=("logits",), teacher=("logits",) if mode == "self" else ())

    @classmethod
    def weights_for(cls, mode: Mode = "virtual", **_params: Any) -> dict[str, float]:
        alpha = _MODE_DEFAULTS[mode][0] if mode in _MODE_DEFAULTS else _MODE_DEFAULTS["virtual"][0]
        return {"ce": 1.0 - alpha, "tfkd": alpha}

    def __init__(
        self,
        ctx: MethodContext,
        mode: Mode = "virtual",
        T: float | None = None,
        multiplier: float | None = None,
        correct_prob: float = 0.99,
    ):
        super().__init__(ctx)
        if mode not in _MODE_DEFAULTS:
            raise ConfigError(f"tfkd: mode must be 'self' or 'virtual', got {mode!r}")
        _alpha, t_default, m_default = _MODE_DEFAULTS[mode]
        self.mode = mode
        self.T = t_default if T is None else T
        self.multiplier = m_default if multiplier is None else multiplier
        self.correct_prob = correct_prob

    def virtual_teacher(self, y: Tensor, num_classes: int, like: Tensor) -> Tensor:
        u = torch.full_like(like, (1.0 - self.correct_prob) / (num_classes - 1))
        u.scatter_(1, y[:, None], self.correct_prob)
        return F.softmax(u / self.T, dim=1)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        z = s.logits
        if self.mode == "virtual":
            q = self.virtual_teacher(batch.y, z.shape[1], z)
            return {"tfkd": elementwise_kl(F.log_softmax(z, dim=1), q) * self.multiplier}
        p_t = F.softmax(t.logits / self.T, dim=1)
        kl = elementwise_kl(F.log_softmax(z / self.T, dim=1), p_t)
        return {"tfkd": kl * self.T**2 * self.multiplier}
