"""CKA layer-group distillation (kdbench's own method).

Idea: a teacher's layers form groups with similar representations (blocks of high linear
CKA). The student's layers are split into as many contiguous groups, and each student
group learns to be CKA-similar to its teacher group:

    K = CKA(student layers, teacher layers)                     (L_s × L_t, this batch)
    ckakd = Σ_i w_i · (1 − mean(K[S_i, T_i]))

Teacher groups T_1..T_n (``grouping="cka"``) are contiguous and chosen once, in
``__init__``, from the teacher's layer-by-layer CKA matrix C on the probe batch
(``ctx.teacher_probe``): the partition minimises the within-group scatter
Σ_i Σ_{a<b ∈ T_i} (1 − C_ab) / |T_i| (Ward / k-means cost with 1 − CKA as the squared
distance), found exactly by dynamic programming over cut points. ``grouping="even"``
splits the teacher evenly instead. Student groups S_i are always an even contiguous
split (earlier groups one layer larger when it does not divide); depths may differ.

Layers (``layers``): ``"blocks"`` (default) relates every residual / conv block's output
(the ``blocks`` tap: resnet20 10, resnet56 28 layers), as the method groups every layer;
``"stages"`` the 3–5 stage outputs (kdbench's former default, where 3 groups of 4 stages
are nearly trivial). When the method context carries no block features (the engine's probe
did not read them), ``"blocks"`` falls back to the stages with a warning, and ``summary()``
says which layers were used.

Parameters: n_groups (default 3, clipped to min(L_s, L_t)), weights (one per group;
None = 1 each), unbiased (the unbiased HSIC estimator; a batch of < 4 samples falls back to
the biased one), grouping, layers.
Default weights: CE 1, ckakd 1 (not tuned; the term lies in [0, n_groups]).
``summary()`` records the groups and the teacher's probe CKA matrix.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.kernels import cka_matrix
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

log = logging.getLogger(__name__)


def even_groups(n_layers: int, n_groups: int) -> list[list[int]]:
    """Contiguous split of range(n_layers) into n_groups sizes differing by at most one."""
    q, r = divmod(n_layers, n_groups)
    groups, start = [], 0
    for i in range(n_groups):
        size = q + (1 if i < r else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def cka_groups(cka: Tensor, n_groups: int) -> list[list[int]]:
    """Contiguous partition of the layers of a CKA matrix minimising the within-group scatter (exact DP)."""
    d = (1.0 - cka.double().cpu()).clamp_min(0)
    d = (d + d.T) / 2
    n = d.shape[0]

    def cost(a: int, b: int) -> float:  # layers a..b-1
        return float(d[a:b, a:b].triu(1).sum()) / (b - a)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(n_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, n_groups + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + cost(i, j)
                if c < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = c, i
    groups, j = [], n
    for k in range(n_groups, 0, -1):
        i = cut[k][j]
        groups.insert(0, list(range(i, j)))
        j = i
    return groups


class CKAKD(Distiller):
    """1 − CKA between matched contiguous groups of student and teacher layers (blocks or stages)."""

    batch_relational = True  # CKA compares the batch's Gram matrices

    taps: ClassVar[Taps] = Taps(student=("logits", "blocks", "stages"), teacher=("blocks", "stages"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "ckakd": 1.0}

    def __init__(
        self,
        ctx: MethodContext,
        n_groups: int = 3,
        weights: list[float] | None = None,
        unbiased: bool = False,
        grouping: Literal["cka", "even"] = "cka",
        layers: Literal["blocks", "stages"] = "blocks",
    ):
        super().__init__(ctx)
        self.layers = _layers_used(ctx, layers, grouping)
        l_s, l_t = len(ctx.student_shapes[self.layers]), len(ctx.teacher_shapes[self.layers])
        if n_groups < 1:
            raise ConfigError(f"ckakd n_groups must be at least 1, got {n_groups}")
        n = min(n_groups, l_s, l_t)
        if weights is not None and len(weights) != n:
            raise ConfigError(
                f"ckakd weights has {len(weights)} entries but there are {n} groups "
                f"(n_groups={n_groups}, student stages={l_s}, teacher stages={l_t})"
            )
        if grouping not in ("cka", "even"):
            raise ConfigError(f"ckakd grouping must be 'cka' or 'even', got {grouping!r}")
        self.unbiased = unbiased
        self.group_weights = [1.0] * n if weights is None else [float(w) for w in weights]
        self.teacher_cka: Tensor | None = None
        if grouping == "cka":
            probe = [] if ctx.teacher_probe is None else getattr(ctx.teacher_probe, self.layers)
            if len(probe) != l_t:
                raise ConfigError(
                    "ckakd grouping='cka' needs the teacher's probe features; use grouping='even'"
                )
            with torch.no_grad():
                self.teacher_cka = cka_matrix(probe, probe, unbiased=unbiased).double().cpu()
            self.teacher_groups = cka_groups(self.teacher_cka, n)
        else:
            self.teacher_groups = even_groups(l_t, n)
        self.student_groups = even_groups(l_s, n)

    @classmethod
    def taps_for(cls, **params: Any) -> Taps:
        """Stages only with ``layers="stages"``; blocks (and stages, the fallback) otherwise."""
        if params.get("layers") == "stages":
            return Taps(student=("logits", "stages"), teacher=("stages",))
        return cls.taps

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        xs, xt = getattr(s, self.layers), getattr(t, self.layers)
        # the unbiased estimator needs 4 samples; a smaller last batch falls back to the biased one
        unbiased = self.unbiased and xs[0].shape[0] >= 4
        k = cka_matrix(xs, xt, unbiased=unbiased)
        loss = k.new_zeros(())
        for w, gs, gt in zip(self.group_weights, self.student_groups, self.teacher_groups, strict=False):
            loss = loss + w * (1 - k[gs[0] : gs[-1] + 1, gt[0] : gt[-1] + 1].mean())
        return {"ckakd": loss}

    def summary(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "teacher_groups": self.teacher_groups,
            "student_groups": self.student_groups,
            "teacher_cka": None if self.teacher_cka is None else self.teacher_cka.tolist(),
        }


def _layers_used(ctx: MethodContext, layers: str, grouping: str) -> str:
    """``layers``, or ``"stages"`` (with a warning) when the context carries no block features."""
    if layers not in ("blocks", "stages"):
        raise ConfigError(f"ckakd layers must be 'blocks' or 'stages', got {layers!r}")
    if layers == "stages":
        return "stages"
    have = "blocks" in ctx.student_shapes and "blocks" in ctx.teacher_shapes
    if have and (grouping != "cka" or (ctx.teacher_probe is not None and ctx.teacher_probe.blocks)):
        return "blocks"
    log.warning("ckakd: the models' block features were not probed; relating their stages instead")
    return "stages"
