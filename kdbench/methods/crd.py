"""CRD: contrastive representation distillation (Tian et al., ICLR 2020).

Pooled features are embedded and L2-normalised (e_s = g_s(f_s), e_t = g_t(f_t), linear,
``feat_dim``). Two memory banks of size N = ``ctx.num_train`` hold a momentum average of
every sample's student and teacher embedding. For a sample i with K negatives j_1..j_K:

    h(v, m) = exp(v·m / τ) / Z                (Z fixed on the first batch: mean(exp) · N)
    NCE(P) = −[ log P_0/(P_0 + K/N + ε) + Σ_k log (K/N)/(P_k + K/N + ε) ]   (ε = 1e-7)
    crd = mean_i NCE(h(e_t, M_s[i, j_1..j_K]))  +  mean_i NCE(h(e_s, M_t[i, j_1..j_K]))

(teacher anchor against the student bank, and the other way round); then the banks'
rows i move to normalize(m·M + (1−m)·e).

Negatives: RepDistiller's CIFAR loader ("exact" mode) draws them from the samples of the
other classes; here they are drawn the same way from ``ctx.train_targets`` (with
replacement; the loader draws without replacement when it can, a negligible difference
for K ≪ N). Without ``train_targets`` they are uniform over the dataset minus the sample.
Needs ``batch.index``.

Reference: HobbitLong/RepDistiller ``crd/criterion.py``, ``crd/memory.py``,
``dataset/cifar100.py``. Defaults: feat_dim 128, nce_k 16384 (clipped to N − 1),
nce_t 0.07, nce_m 0.5, β = 0.8, CE weight 1 (``-a 0 -b 0.8``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods._util import l2_normalize
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

EPS = 1e-7


def nce_loss(p: Tensor, num_data: int) -> Tensor:
    """NCE loss of [B, K+1] scores whose column 0 is the positive (RepDistiller's ContrastLoss)."""
    k = p.shape[1] - 1
    noise = k / num_data
    log_pos = (p[:, 0] / (p[:, 0] + noise + EPS)).log()
    log_neg = (noise / (p[:, 1:] + noise + EPS)).log()
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


class CRD(Distiller):
    """Contrastive loss between student and teacher embeddings with memory-bank negatives."""

    taps: ClassVar[Taps] = Taps(student=("logits", "pooled"), teacher=("pooled",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "crd": 0.8}

    def __init__(
        self,
        ctx: MethodContext,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ):
        super().__init__(ctx)
        n = ctx.num_train
        self.nce_k = max(1, min(nce_k, n - 1))
        self.nce_t = nce_t
        self.nce_m = nce_m
        self.embed_s = nn.Linear(ctx.student_shapes["pooled"][0], feat_dim)
        self.embed_t = nn.Linear(ctx.teacher_shapes["pooled"][0], feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, feat_dim) * 2 * stdv - stdv)
        self.register_buffer("memory_t", torch.rand(n, feat_dim) * 2 * stdv - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # normalisers of the student / teacher scores
        targets = ctx.train_targets
        self.by_class = targets is not None
        if targets is not None:
            targets = targets.long().cpu()
            counts = torch.bincount(targets, minlength=int(targets.max()) + 1)
            self.register_buffer("order", torch.argsort(targets, stable=True), persistent=False)
            self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
            self.register_buffer("class_count", counts, persistent=False)
            self.register_buffer("targets", targets, persistent=False)

    def sample_negatives(self, index: Tensor) -> Tensor:
        """[B, K+1] indices: the sample itself, then K negatives."""
        b, n, k = index.shape[0], self.memory_s.shape[0], self.nce_k
        index = index.to(self.memory_s.device)
        if self.by_class:
            cls = self.targets[index]
            start, count = self.class_start[cls][:, None], self.class_count[cls][:, None]
            r = (torch.rand(b, k, device=index.device) * (n - count)).long()
            neg = self.order[r + count * (r >= start)]
        else:
            r = (torch.rand(b, k, device=index.device) * (n - 1)).long()
            neg = r + (r >= index[:, None]).long()
        return torch.cat([index[:, None], neg], 1)

    def contrast(self, e_s: Tensor, e_t: Tensor, index: Tensor, contrast_idx: Tensor) -> Tensor:
        """The two-sided NCE loss for given negatives; updates the memory banks."""
        n = self.memory_s.shape[0]
        w_s = self.memory_s[contrast_idx].to(e_s.dtype)  # [B, K+1, D]
        w_t = self.memory_t[contrast_idx].to(e_s.dtype)
        p_t = torch.exp(torch.bmm(w_s, e_t.unsqueeze(2)).squeeze(2) / self.nce_t)  # teacher anchor
        p_s = torch.exp(torch.bmm(w_t, e_s.unsqueeze(2)).squeeze(2) / self.nce_t)  # student anchor
        if self.z[0] < 0:
            self.z[0] = p_s.detach().mean() * n
            self.z[1] = p_t.detach().mean() * n
        loss = nce_loss(p_s / self.z[0], n) + nce_loss(p_t / self.z[1], n)
        with torch.no_grad():
            for bank, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
                new = bank[index] * self.nce_m + e.detach().to(bank.dtype) * (1 - self.nce_m)
                bank[index] = l2_normalize(new)
        return loss

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.pooled is not None and t.pooled is not None
        e_s = l2_normalize(self.embed_s(s.pooled.flatten(1)))
        e_t = l2_normalize(self.embed_t(t.pooled.flatten(1)))
        index = batch.index.to(self.memory_s.device)
        return {"crd": self.contrast(e_s, e_t, index, self.sample_negatives(index))}
