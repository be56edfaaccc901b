"""SemCKD: cross-layer distillation with semantic calibration (Chen et al., AAAI 2021).

Every student stage i (``stages[1:]``, the reference's ``feat[1:-1]``) may learn from every
teacher stage j. Per sample b, an attention α[b, i, j] says how much:

    G_l  = F_l F_lᵀ  (B×B Gram of the flattened stage over the batch)
    q_i  = MLP^q_i(G^s_i)[b],  k_j = MLP^k_j(G^t_j)[b]   (MLP: B → 2·B/4 → ReLU → B/4, L2-normalised)
    α    = softmax_j( q_i · k_j / soft )
    semckd = Σ_{b,i,j} α[b,i,j] · mean_{chw}( P_ij(s_i)[b] − t_j[b] )² / (B · L_s)

P_ij (1×1 conv → BN → ReLU → 3×3 conv → BN → ReLU → 1×1 conv, mid = 2·C_t) maps student
stage i to teacher stage j's channels after the larger map is pooled to the smaller size.

The MLPs take a row of the Gram, so the batch size is part of the architecture
(``ctx.batch_size``). The reference skips a smaller last batch; here its Gram rows are
zero-padded to ``ctx.batch_size`` columns so every batch contributes.

Reference: DefangChen/SemCKD ``distiller_zoo/SemCKD.py``, ``models/util.py`` (SelfA, Proj,
MLPEmbed); the same code in DefangChen/SimKD. Defaults: soft = 1, factor = 4, β = 400 with
CE 1 and KD 1 (T = 4) as in SimKD ``scripts/run_distill.sh`` (``-c 1 -d 1 -b 400``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods._blocks import conv1x1, conv3x3, pool_to_smaller
from kdbench.methods._util import l2_normalize
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 2 * d_out), nn.ReLU(), nn.Linear(2 * d_out, d_out))


def _proj(c_in: int, c_out: int) -> nn.Sequential:
    mid = 2 * c_out
    return nn.Sequential(
        conv1x1(c_in, mid), nn.BatchNorm2d(mid), nn.ReLU(),
        conv3x3(mid, mid), nn.BatchNorm2d(mid), nn.ReLU(),
        conv1x1(mid, c_out),
    )  # fmt: skip


class SemCKD(Distiller):
    """Attention-weighted all-pairs stage regression, attention from batch Gram matrices."""

    batch_relational = True

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("logits", "stages"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "kd": 1.0, "semckd": 400.0}

    def __init__(self, ctx: MethodContext, soft: float = 1.0, factor: int = 4, T: float = 4.0):
        super().__init__(ctx)
        self.soft, self.T = soft, T
        self.batch_size = ctx.batch_size
        s_c = [x[0] for x in ctx.student_shapes["stages"][1:]]
        t_c = [x[0] for x in ctx.teacher_shapes["stages"][1:]]
        d = ctx.batch_size
        self.query = nn.ModuleList(_mlp(d, d // factor) for _ in s_c)
        self.key = nn.ModuleList(_mlp(d, d // factor) for _ in t_c)
        self.proj = nn.ModuleList(nn.ModuleList(_proj(a, b) for b in t_c) for a in s_c)

    def _embed(self, mlps: nn.ModuleList, feats: list[Tensor]) -> Tensor:
        """[b, L, d] L2-normalised embeddings of each stage's Gram rows."""
        b = feats[0].shape[0]
        out = []
        for mlp, f in zip(mlps, feats, strict=False):
            f = f.flatten(1)
            gram = F.pad(f @ f.T, (0, self.batch_size - b))
            out.append(l2_normalize(mlp(gram)))
        return torch.stack(out, 1)

    def attention(self, g_s: list[Tensor], g_t: list[Tensor]) -> Tensor:
        """[b, L_s, L_t] attention of each student stage over the teacher stages."""
        b = g_s[0].shape[0]
        if b > self.batch_size:
            raise ConfigError(
                f"semckd was built for batches of at most {self.batch_size} samples (ctx.batch_size) "
                f"but got {b}; its attention MLPs take one row of the batch Gram"
            )
        q, k = self._embed(self.query, g_s), self._embed(self.key, g_t)
        return F.softmax(q @ k.transpose(1, 2) / self.soft, dim=-1)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.logits is not None and t.logits is not None
        g_s, g_t = s.stages[1:], t.stages[1:]
        att = self.attention(g_s, g_t)
        b = g_s[0].shape[0]
        per_pair = []
        for i, f_s in enumerate(g_s):
            for j, f_t in enumerate(g_t):
                src, tgt = pool_to_smaller(f_s, f_t)
                per_pair.append((self.proj[i][j](src) - tgt).pow(2).flatten(1).mean(1))
        ind = torch.stack(per_pair, 1).view(b, len(g_s), len(g_t))
        loss = (att * ind).sum() / (b * len(g_s))
        return {"semckd": loss, "kd": kd_loss(s.logits, t.logits, self.T)}
