"""One-for-All KD, OFA-KD (Hao et al., NeurIPS 2023, "One-for-All: Bridge the Gap Between
Heterogeneous Architectures in Knowledge Distillation", arXiv 2310.19444).

Distillation between heterogeneous architectures (CNN ↔ ViT ↔ MLP). Intermediate features do
not live in comparable spaces, so each chosen student stage gets a branch that projects its
feature into the logit space, and every branch is trained against the teacher's logits with the
OFA loss, as are the student's own logits. With p = softmax(z / T), e = one-hot(y) and ε the
modulating exponent that enhances the target class:

    ofa(z_s, z_t; ε) = − mean_b Σ_c [(p_t,c + e_c)^ε − e_c] · log p_s,c
                     = − mean_b [((1 + p_t,y)^ε − 1) · log p_s,y + Σ_{c≠y} p_t,c^ε · log p_s,c]

    total = CE(z_s, y) + w_ofa_logits · ofa(z_s, z_t; ε_L) + w_ofa · Σ_i ofa(branch_i(f_i), z_t; ε_i)

(ε = 1 is the cross-entropy with the teacher's distribution; there is no T² factor.) The teacher
is detached; the branches are trained with the student and dropped after training.

Branch of stage i (L: the number of student stages after the stem, i: the stage's index in the
student's stage taps, whose entry 0 is the stem; d_s, d_t: the pooled feature widths), chosen
by the stage's feature shape:

- a conv stage ``(C, H, W)`` (CNN students): L − i separable convolutions (3×3 depthwise stride 2,
  1×1, BN, ReLU, 3×3 depthwise, 1×1, BN, ReLU), the channels doubling and the last one giving
  max(d_s, d_t) channels (a 1×1 convolution to max(d_s, d_t) for the last stage, i = L), global
  average pooling, a linear layer to the classes;
- a token stage ``(N, D)`` (ViT, Swin, MLP students): the k = N − ⌊√N⌋² leading tokens (the class
  token) are set aside, the g × g patch grid is merged max(⌊log2(g / token_grid)⌋, 0) times by 2×2
  patch merging (LayerNorm, linear without bias to d_s, GELU; the last of several merges has no
  GELU), the class token rejoins, max(L − i, 1) transformer blocks of width d_s (4 heads, MLP ratio
  4, no qkv bias) follow, then the class token (or, without one, the mean token) goes through a
  linear layer to the classes.

Each stage's choice is in :meth:`OFA.describe` and in the cell's result (``summary``).

Reference: Hao840/OFAKD (commit f7bb896) ``distillers/ofa.py`` (``ofa_loss``, class ``OFA``) and
``distillers/utils.py`` (``SepConv``, ``PatchMerging``, ``TokenFnContext``, ``init_weights``), timm
0.6.5's ``vision_transformer.Block``. Defaults are the CIFAR-100 command of the README
(``--ofa-eps 1.0``; ImageNet uses 1.5) and ``train.py``'s arguments: ``--ofa-stage 1 2 3 4`` (every
stage after the stem), ``--ofa-temperature 1``, ``--gt-loss-weight 1``, ``--kd-loss-weight 1``
(the logit term, ``ofa_logits`` here), ``--ofa-loss-weight 1`` (the stage terms, ``ofa``). Their
CIFAR-100 recipe (``configs/cifar/cnn.yaml``: SGD lr 0.05, cosine, 300 epochs, batch 128,
weight decay 2e-3, label smoothing 0.1; ViT / MLP students ``configs/cifar/vit_mlp.yaml``)
resizes the images to the models' 224 × 224 input, hence the 7 × 7 target grid (224 / 32).

Where this generalises the reference: its stage numbers 1–4 of four-stage ImageNet models become
indices into the student's stage taps (stage count L instead of 4); the class token is found
from the token count (the reference reads ``student.num_tokens``, an attribute timm 0.6.5's
VisionTransformer no longer has, so a ViT student there loses its class token handling); a
student whose stages mix both kinds gets each stage's own branch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

#: attention heads of the token branches' transformer blocks (fixed in the reference)
HEADS = 4


def ofa_loss(z_s: Tensor, z_t: Tensor, y: Tensor, eps: float, T: float = 1.0) -> Tensor:
    """−mean_b Σ_c [(p_t + e)^ε − e] · log p_s with p = softmax(z / T), e the one-hot label."""
    e = F.one_hot(y, z_s.shape[1]).to(z_s.dtype)
    weight = (F.softmax(z_t / T, dim=1) + e).pow(eps) - e
    return -(weight * F.log_softmax(z_s / T, dim=1)).sum(1).mean()


# --------------------------------------------------------------------------- conv branch


def sep_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Depthwise-separable block halving the resolution (3×3 dw /2, 1×1, BN, ReLU, 3×3 dw, 1×1, BN, ReLU)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def conv_branch(channels: int, n_down: int, width: int, num_classes: int) -> nn.Sequential:
    """``n_down`` separable convs (channels doubling, the last to ``width``), or a 1×1 conv to
    ``width`` when ``n_down`` is 0; then global average pooling and a linear layer."""
    layers: list[nn.Module] = []
    if n_down == 0:
        layers.append(nn.Conv2d(channels, width, 1))
    c = channels
    for j in range(n_down):
        layers.append(sep_conv(c, width if j == n_down - 1 else 2 * c))
        c *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


# --------------------------------------------------------------------------- token branch


class PatchMerge(nn.Module):
    """2×2 neighbouring tokens of a g × g grid concatenated (Swin's order), LayerNorm, linear, activation."""

    def __init__(self, grid: int, dim: int, out_dim: int, gelu: bool):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if gelu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        h = self.grid // 2
        # token (2h'+dh, 2w'+dw) -> slot (dw, dh) of merged token (h', w'): x0..x3 = (0,0),(1,0),(0,1),(1,1)
        x = x.reshape(b, h, 2, h, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h * h, 4 * c)
        return self.act(self.reduction(self.norm(x)))


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias, softmax(q kᵀ / √d_head) v, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + attn(LN(x)), then x + MLP(LN(x)) (ratio 4, GELU)."""

    def __init__(self, dim: int, heads: int = HEADS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenBranch(nn.Module):
    """Set the ``prefix`` leading tokens aside, merge the patch grid, put them back, transformer
    blocks, read out the class token (the mean token without one), linear layer to the classes."""

    def __init__(
        self, prefix: int, grid: int, dim: int, width: int, merges: int, blocks: int, num_classes: int
    ):
        super().__init__()
        self.prefix = prefix
        self.merge = nn.Sequential(
            *(
                PatchMerge(grid >> j, dim if j == 0 else width, width, gelu=j == 0 or j != merges - 1)
                for j in range(merges)
            )
        )
        self.blocks = nn.Sequential(*(TransformerBlock(width) for _ in range(blocks)))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        k = self.prefix
        patches = self.merge(x[:, k:])
        x = self.blocks(torch.cat([x[:, :k], patches], 1) if k else patches)
        return self.fc(x[:, 0] if k else x.mean(1))


def init_branch(module: nn.Module) -> None:
    """The reference's initialisation: convs Kaiming-normal (fan-out, ReLU), BN 1/0, linear
    truncated normal (std 0.02) with zero bias; LayerNorm and conv biases as PyTorch makes them."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- the method


def _width(shapes: dict, model: str) -> int:
    pooled = shapes.get("pooled")
    if not pooled:
        raise ConfigError(
            f"ofa needs the {model}'s pooled feature (the input of its classifier); "
            "name the classifier in the grid (model params `taps: {classifier: path}`)"
        )
    return int(pooled[-1])


class OFA(Distiller):
    """Stage features projected into the logit space, each branch and the logits trained with the OFA loss."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages", "pooled"), teacher=("logits", "pooled"))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "ofa_logits": 1.0, "ofa": 1.0}

    def __init__(
        self,
        ctx: MethodContext,
        eps: float | list[float] = 1.0,
        T: float = 1.0,
        stages: list[int] | None = None,
        token_grid: int = 7,
    ):
        super().__init__(ctx)
        shapes = [tuple(s) for s in ctx.student_shapes.get("stages") or []]
        n_after_stem = len(shapes) - 1
        chosen = list(range(1, len(shapes))) if stages is None else list(stages)
        if not chosen:
            raise ConfigError(
                f"ofa projects stages after the stem, but the student has {len(shapes)} stage tap(s); "
                "name its stages in the grid (stem first) or list `stages:` indices"
            )
        bad = [i for i in chosen if not -len(shapes) <= i < len(shapes)]
        if bad:
            raise ConfigError(f"ofa: stages {bad} out of range; the student has {len(shapes)} stage taps")
        self.stages = [i % len(shapes) for i in chosen]
        eps_list = [float(eps)] * (len(self.stages) + 1) if isinstance(eps, int | float) else list(eps)
        if len(eps_list) == 1:
            eps_list *= len(self.stages) + 1
        if len(eps_list) != len(self.stages) + 1:
            raise ConfigError(
                f"ofa: eps has {len(eps_list)} values; give one, or one per stage plus one for the logits "
                f"({len(self.stages) + 1})"
            )
        self.eps = eps_list
        self.T = T
        d_s, d_t = _width(ctx.student_shapes, "student"), _width(ctx.teacher_shapes, "teacher")
        self.plan: list[str] = []
        branches = []
        for i in self.stages:
            branch, text = self._branch(shapes[i], i, n_after_stem, d_s, d_t, token_grid, ctx.num_classes)
            branches.append(branch)
            self.plan.append(f"stage {i} {'x'.join(map(str, shapes[i]))}: {text}")
        self.branches = nn.ModuleList(branches)
        init_branch(self.branches)

    @staticmethod
    def _branch(
        shape: tuple, i: int, n_after_stem: int, d_s: int, d_t: int, token_grid: int, num_classes: int
    ) -> tuple[nn.Module, str]:
        """The branch of stage ``i`` (feature ``shape``) and a one-line description of it."""
        if len(shape) == 3:
            width, n_down = max(d_s, d_t), max(n_after_stem - i, 0)
            how = f"{n_down} sep-conv /2" if n_down else "1x1 conv"
            return conv_branch(shape[0], n_down, width, num_classes), f"conv: {how} -> {width}, pool, fc"
        if len(shape) != 2:
            raise ConfigError(
                f"ofa: stage {i} has feature shape {shape}; expected (C, H, W) or (tokens, dim)"
            )
        n, dim = shape
        grid = math.isqrt(n)
        prefix = n - grid * grid
        merges = max(int(math.floor(math.log2(grid / token_grid))), 0) if grid else 0
        if any((grid >> j) % 2 for j in range(merges)):
            raise ConfigError(
                f"ofa: stage {i}'s {grid}x{grid} patch grid cannot be merged 2x2 {merges} times"
            )
        if merges == 0 and dim != d_s:
            raise ConfigError(
                f"ofa: stage {i} has width {dim} but the student's pooled feature {d_s}, and its "
                f"{grid}x{grid} grid is not merged (no projection); choose another stage"
            )
        if d_s % HEADS:
            raise ConfigError(
                f"ofa: the token branches use {HEADS} heads; the student's width {d_s} is not a multiple"
            )
        blocks = max(n_after_stem - i, 1)
        branch = TokenBranch(prefix, grid, dim, d_s, merges, blocks, num_classes)
        readout = "class token" if prefix else "mean token"
        cls = {0: "", 1: "class token + "}.get(prefix, f"{prefix} prefix tokens + ")
        text = (
            f"tokens: {cls}{grid}x{grid} grid, {merges} merge(s) -> {d_s}, {blocks} block(s), {readout}, fc"
        )
        return branch, text

    def describe(self) -> str:
        """The branch chosen for each stage, e.g. ``stage 1 16x8x8: conv: 2 sep-conv /2 -> 64, pool, fc``."""
        return "; ".join(self.plan)

    def summary(self) -> dict[str, Any]:
        return {"ofa_branches": list(self.plan)}

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        z_t = t.logits.detach()
        stage_terms = [
            ofa_loss(branch(s.stages[i]), z_t, batch.y, eps, self.T)
            for branch, i, eps in zip(self.branches, self.stages, self.eps[:-1], strict=True)
        ]
        return {
            "ofa_logits": ofa_loss(s.logits, z_t, batch.y, self.eps[-1], self.T),
            "ofa": torch.stack(stage_terms).sum(),
        }
