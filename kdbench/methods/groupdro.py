"""Group DRO (Sagawa, Koh, Hashimoto, Liang, ICLR 2020): the worst group's loss, minimised online.

The student's cross-entropy term becomes an adversarially weighted mean of per-group losses.
Online weights ``q`` over the groups (uniform at the start) follow exponentiated gradient
ascent on the group losses, updated *before* the loss is formed:

    L_g      = mean CE over the batch's samples of group g (0 for a group absent from the batch)
    q_g     <- q_g * exp(eta_q * (L_g + C / sqrt(n_g)));   q <- q / sum(q)
    loss     = sum_g q_g L_g          (with the new q; q is a constant for the gradient)

``n_g`` is group g's count in the training split and ``C`` the generalisation adjustment
(``adjustment``; 0 = off, as in the reference unless ``--generalization_adjustment`` is set).
Reference: kohpangwei/group_DRO ``loss.py`` ``LossComputer.compute_robust_loss`` (defaults
``step_size`` 0.01, adjustment 0). There the adjusted losses alias the group losses (an in-place
``+=``), so its reported loss includes ``sum_g q_g C / sqrt(n_g)``; that constant has no gradient
and kdbench reports ``sum_g q_g L_g``. A group with no training samples keeps adjustment 0 (the
reference's datasets have none). Samples whose group is unknown (-1) do not enter the loss.

Two ways to use it (the weights ``q`` are checkpointed, so a resumed cell continues exactly):

* ``train: {objective: groupdro}`` (or ``{objective: {groupdro: {step_size: 0.01, adjustment: 1}}}``)
  replaces the cross-entropy term of any method (``kd``, ``dkd`` ... the student's CE only; the
  method's own terms are unchanged), grid-wide or in one method row;
* the method ``groupdro`` (its parameters the same): the student alone trained with group DRO,
  no teacher -- ``ce`` with ``train.objective: groupdro``.

Needs a dataset with groups (``spurious``, ``waterbirds``, ``celeba``: meta ``"group"``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

#: objectives ``train.objective`` may name, with their parameters' defaults
OBJECTIVES: dict[str, dict[str, float]] = {"groupdro": {"step_size": 0.01, "adjustment": 0.0}}


def check_objective(value: Any) -> dict[str, Any] | None:
    """A ``train.objective`` setting as ``{"name", "params"}`` with every parameter, or None (CE).

    Accepts ``None``/``"ce"``, ``"groupdro"``, ``{"groupdro": {step_size, adjustment}}`` and the
    resolved form itself (what a cell's ``config.json`` holds).
    """
    if value is None or value == "ce":
        return None
    if isinstance(value, dict) and set(value) == {"name", "params"}:
        name, params = value["name"], value["params"]
    elif isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, dict) and len(value) == 1:
        name, params = next(iter(value.items()))
    else:
        raise ValueError(f"expected an objective name or {{name: {{params}}}}, got {value!r}")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose ce or {', '.join(OBJECTIVES)}")
    params = dict(params or {})
    defaults = OBJECTIVES[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"objective {name}: unknown parameter(s) {', '.join(unknown)}; use {', '.join(defaults)}"
        )
    out: dict[str, float] = {}
    for k, default in defaults.items():
        v = params.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f"objective {name}: {k} must be a number >= 0, got {v!r}")
        out[k] = float(v)
    if out["step_size"] <= 0:
        raise ValueError(f"objective {name}: step_size must be > 0, got {out['step_size']}")
    return {"name": name, "params": out}


def group_mean_losses(per_sample: Tensor, groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """(mean loss, count) of each group in a batch; a group absent from it has loss 0.

    Samples of group -1 (unknown) are left out.
    """
    known = groups >= 0
    per_sample, groups = per_sample[known], groups[known]
    counts = torch.bincount(groups, minlength=n_groups).to(per_sample.dtype)
    sums = torch.zeros(n_groups, dtype=per_sample.dtype, device=per_sample.device)
    sums = sums.index_add(0, groups, per_sample)
    return sums / counts.clamp_min(1), counts


class GroupDRO(nn.Module):
    """The group DRO loss with its online group weights ``q`` (a buffer: saved in checkpoints)."""

    def __init__(self, group_counts: Tensor, step_size: float = 0.01, adjustment: float = 0.0):
        super().__init__()
        counts = torch.as_tensor(group_counts, dtype=torch.float32)
        n = len(counts)
        self.step_size = float(step_size)
        adj = torch.zeros(n)
        if adjustment > 0:
            seen = counts > 0
            adj[seen] = float(adjustment) / counts[seen].sqrt()
        self.register_buffer("q", torch.full((n,), 1.0 / n))
        self.register_buffer("adjust", adj)
        self.register_buffer("counts", counts)

    @property
    def n_groups(self) -> int:
        return len(self.q)

    def forward(self, logits: Tensor, y: Tensor, groups: Tensor) -> Tensor:
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least under autocast
        per_sample = F.cross_entropy(wide, y, reduction="none")
        group_loss, _ = group_mean_losses(per_sample, groups.long(), self.n_groups)
        self.update(group_loss.detach())
        return group_loss @ self.q.to(group_loss.dtype)

    @torch.no_grad()
    def update(self, group_loss: Tensor) -> None:
        """One exponentiated-gradient step of ``q`` on the (adjusted) group losses."""
        q = self.q * torch.exp(self.step_size * (group_loss.to(self.q) + self.adjust))
        self.q.copy_(q / q.sum())


def build_objective(
    spec: dict[str, Any] | None, groups: Tensor | None, n_groups: int | None = None
) -> GroupDRO | None:
    """The objective of a recipe's ``objective`` (None: plain cross-entropy) for a training split
    whose samples have ``groups`` (the split's own samples; None: the data has no groups)."""
    spec = check_objective(spec)
    if spec is None:
        return None
    if groups is None:
        raise ConfigError(
            f"train.objective {spec['name']} needs a dataset with groups (meta 'group'): use a group "
            "dataset (spurious, waterbirds, celeba) or leave the objective at ce"
        )
    groups = groups.long()
    known = groups[groups >= 0]
    n = max(int(n_groups or 0), int(known.max()) + 1 if len(known) else 1)
    return GroupDRO(torch.bincount(known, minlength=n), **spec["params"])


class GroupDROStudent(Distiller):
    """The student alone trained with group DRO in place of cross-entropy (no teacher)."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=())
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0}
    requires_teacher: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext, step_size: float = 0.01, adjustment: float = 0.0):
        super().__init__(ctx)
        check_objective({"groupdro": {"step_size": step_size, "adjustment": adjustment}})

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Config-time check of a grid's parameters (the values' ranges)."""
        try:
            check_objective({"groupdro": params})
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def train_for(cls, step_size: float = 0.01, adjustment: float = 0.0) -> dict[str, Any]:
        """The ``train`` fields this method sets for its cells: the objective (the engine's)."""
        return {
            "objective": check_objective({"groupdro": {"step_size": step_size, "adjustment": adjustment}})
        }

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {}
