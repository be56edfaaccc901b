"""WKD: Wasserstein distance based KD (Lv et al., NeurIPS 2024, arXiv 2412.08139).

**WKD-L** (logits). The target class is distilled as in NKD; the other classes' distributions
are compared with an entropic discrete Wasserstein distance whose ground cost is the category
interrelation C (here: from the teacher classifier's weights, or a K×K matrix from a file):

    target = − mean_b p_t[b, y_b] · log p_s[b, y_b]                     (T = 1, teacher detached)
    p̂      = softmax(z[others] / T)                                     (target class removed)
    C      = 1 − exp(−σ · (1 − cos(w_i, w_j)))                          (σ: sharpen; σ = 0: 1 − cos)
    π      = Sinkhorn(p̂_s, p̂_t, relu(C) + 1e-8, λ, iters)              (u₀ = 1/(K−1), +1e-8 in each division)
    wkd_l  = mean_b Σ_ij π_b[i, j] · C[i, j]

**WKD-F** (features). The last stages are modelled as diagonal Gaussians (per-channel mean and
standard deviation over the spatial positions, or over a grid × grid of regions), and the
Gaussian Wasserstein distance is split in a mean and a covariance part:

    f      = ConvReg(student's last stage)                              (1×1 conv + BN + ReLU)
    mean   = Σ (μ_s − μ_t)² / (B · grid²),   cov = Σ (σ_s − σ_t)² / (B · grid²),   σ = sqrt(var + eps)
    wkd_f  = ratio · mean + cov                                          (var unbiased, as torch.var)

Both weights decay by a cosine from 150/240 of the epochs to zero at the end, as the reference
(``COSINE_DECAY_EPOCH`` 150 of 240; here a fraction ``decay_start`` of the run's epochs).
The engine's total is CE + target + w_l·decay·wkd_l + w_f·decay·wkd_f.

Reference: JiamingLv/WKD (commit 214cf88) ``mdistiller/distillers/WKD.py`` (``sinkhorn``,
``wkd_logit_loss_with_speration``, ``wkd_feature_loss``, ``adaptive_avg_std_pool2d``, WKD.__init__'s
``COST_MATRIX == "fc"`` and ``COST_MATRIX_SHARPEN``, the decay in ``forward_train``);
``mdistiller/distillers/_common.py`` ``ConvReg``. CIFAR-100 defaults from
``configs/cifar100/wkd_{l,f,lf}/res32x4_res8x4.yaml``: WKD-L T = 8, λ = 0.05, 10 iterations,
sharpen 1, weight 600 (200 with WKD-F); WKD-F weight 0.08, ratio 4 (8 with WKD-L), grid 1, eps 1e-5;
CE 1. (The wrn40_2→ShuffleV1 configs use T = 6, weight 200; WKD-F weight 0.3, ratio 3, grid 4.)
Those configs take the cost from a file of linear CKA between the teacher's class-wise features
over the training set (``tools/generate_cost_matrix.py``); kdbench builds none at run time, so the
default cost is the reference's ``"fc"`` option (the teacher classifier's weights) and
``cost: path/to/matrix.{pt,pth,npy}`` uses such a file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods._util import ConvReg
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

MODES = ("l", "f", "lf")


def classifier_cost(weight: Tensor, sharpen: float = 1.0) -> Tensor:
    """Category cost from classifier rows: 1 − cos, sharpened to 1 − exp(−σ(1 − cos)) when σ ≠ 0."""
    w = F.normalize(weight, p=2, dim=-1)
    dist = 1 - w @ w.T
    return 1 - torch.exp(-sharpen * dist) if sharpen != 0 else dist


def sinkhorn_distance(p: Tensor, q: Tensor, cost: Tensor, reg: float, iters: int) -> Tensor:
    """Entropic OT cost Σ π·C per row of p, q (B, n) with cost (B, n, n), the reference's Sinkhorn."""
    kernel = torch.exp(-cost / reg)
    u = torch.full_like(p, 1.0 / p.shape[1]).unsqueeze(-1)
    p, q = p.unsqueeze(-1), q.unsqueeze(-1)
    for _ in range(iters):
        v = q / (kernel.transpose(1, 2) @ u + 1e-8)
        u = p / (kernel @ v + 1e-8)
    flow = u * kernel * v.transpose(1, 2)
    return (flow * cost).sum((1, 2)).mean()


def wkd_logit_terms(
    z_s: Tensor, z_t: Tensor, y: Tensor, cost: Tensor, T: float, reg: float, iters: int
) -> tuple[Tensor, Tensor]:
    """(target term, Wasserstein term over the non-target classes) of WKD-L."""
    y = y.view(-1, 1)
    target = -(F.softmax(z_t, 1).gather(1, y) * F.log_softmax(z_s, 1).gather(1, y)).mean()
    n, k = z_s.shape
    others = torch.ones_like(z_s, dtype=torch.bool).scatter_(1, y, False)
    p_s = F.softmax(z_s[others].reshape(n, k - 1) / T, dim=-1)
    p_t = F.softmax(z_t[others].reshape(n, k - 1) / T, dim=-1)
    pair = others.unsqueeze(1) & others.unsqueeze(2)
    c = (F.relu(cost) + 1e-8).expand(n, k, k)[pair].reshape(n, k - 1, k - 1)
    return target, sinkhorn_distance(p_s, p_t, c, reg, iters)


def _region_bounds(n: int, grid: int) -> list[tuple[int, int]]:
    return [((i * n) // grid, -(-((i + 1) * n) // grid)) for i in range(grid)]


def _check_regions(size: tuple[int, int], grid: int) -> None:
    """Each region needs two positions for its (unbiased) variance; refuse a grid that leaves one."""
    if grid < 1:
        raise ConfigError(f"wkd grid must be a positive number of regions per side, got {grid}")
    smallest = min(r1 - r0 for r0, r1 in _region_bounds(size[0], grid))
    smallest *= min(c1 - c0 for c0, c1 in _region_bounds(size[1], grid))
    if smallest < 2:
        raise ConfigError(
            f"wkd-f models each of grid×grid regions of the teacher's last {size[0]}×{size[1]} map as a "
            f"Gaussian and needs at least 2 positions per region; grid {grid} leaves {smallest}. "
            "Use a smaller grid, larger images, or mode 'l'"
        )


def gaussian_moments(f: Tensor, grid: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and sqrt(unbiased var + eps) over each of grid × grid regions: (B, C, g, g).

    Regions are the reference's (and adaptive pooling's): rows floor(i·H/g) to ceil((i+1)·H/g).
    """
    mu = torch.empty(*f.shape[:2], grid, grid, dtype=f.dtype, device=f.device)
    sd = torch.empty_like(mu)
    for i, (r0, r1) in enumerate(_region_bounds(f.shape[2], grid)):
        for j, (c0, c1) in enumerate(_region_bounds(f.shape[3], grid)):
            block = f[:, :, r0:r1, c0:c1]
            mu[:, :, i, j] = block.mean((-1, -2))
            sd[:, :, i, j] = torch.sqrt(block.var(dim=(-1, -2)) + eps)
    return mu, sd


def wkd_feature_terms(f_s: Tensor, f_t: Tensor, grid: int = 1, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(mean part, covariance part) of the Gaussian Wasserstein distance between two maps."""
    mu_s, sd_s = gaussian_moments(f_s, grid, eps)
    mu_t, sd_t = gaussian_moments(f_t, grid, eps)
    norm = grid**2 * f_s.shape[0]
    return (mu_s - mu_t).pow(2).sum() / norm, (sd_s - sd_t).pow(2).sum() / norm


def cosine_decay(epoch: int, epochs: int, start: float) -> float:
    """The reference's weight factor at ``epoch`` (counted from 1): 1 until ``start``, then a cosine to 0."""
    if epoch <= start:
        return 1.0
    return 0.5 * (1 + math.cos((epoch - start) / (epochs - start) * math.pi))


def _load_cost(path: str, k: int) -> Tensor:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"wkd cost {path!r}: no such file; give 'fc' or a K×K matrix (.pt, .pth, .npy)")
    m = torch.from_numpy(np.load(p)) if p.suffix == ".npy" else torch.load(p, map_location="cpu")
    if not isinstance(m, Tensor) or m.shape != (k, k):
        got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ConfigError(f"wkd cost {path!r} must hold a {k}×{k} matrix, got {got}")
    return m.detach().float()


def classifier_cost_from_file(path: str, k: int, sharpen: float) -> Tensor:
    """A K×K distance matrix from a file, sharpened as the reference does (1 − exp(−σ·d))."""
    dist = _load_cost(path, k)
    return 1 - torch.exp(-sharpen * dist) if sharpen != 0 else dist


class WKD(Distiller):
    """Wasserstein distillation of the logits (WKD-L), the last stages (WKD-F), or both (mode "lf")."""

    #: term weights of each mode (the configs' WKD_LOGIT_WEIGHT / WKD_FEAT_WEIGHT, CE_WEIGHT 1);
    #: the target term of WKD-L has weight 1 in the reference
    MODE_WEIGHTS: ClassVar[dict[str, dict[str, float]]] = {
        "l": {"ce": 1.0, "wkd_target": 1.0, "wkd_l": 600.0},
        "f": {"ce": 1.0, "wkd_f": 0.08},
        "lf": {"ce": 1.0, "wkd_target": 1.0, "wkd_l": 200.0, "wkd_f": 0.08},
    }
    default_weights: ClassVar[dict[str, float]] = MODE_WEIGHTS["l"]

    @classmethod
    def weights_for(cls, mode: str = "l", **_params: Any) -> dict[str, float]:
        return dict(cls.MODE_WEIGHTS.get(mode, cls.default_weights))

    @classmethod
    def taps_for(cls, mode: str = "l", **_params: Any) -> Taps:
        if mode == "l":
            return Taps(student=("logits",), teacher=("logits",))
        return Taps(student=("logits", "stages"), teacher=("logits", "stages"))

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))

    def __init__(
        self,
        ctx: MethodContext,
        mode: str = "l",
        T: float = 8.0,
        sinkhorn_lambda: float = 0.05,
        sinkhorn_iters: int = 10,
        cost: str = "fc",
        sharpen: float = 1.0,
        ratio: float | None = None,
        grid: int = 1,
        eps: float = 1e-5,
        decay_start: float = 150 / 240,
    ):
        super().__init__(ctx)
        if mode not in MODES:
            raise ConfigError(f"wkd mode must be one of {MODES} (logits, features, both), got {mode!r}")
        self.mode, self.T, self.decay_start = mode, T, decay_start
        self.sinkhorn_lambda, self.sinkhorn_iters = sinkhorn_lambda, sinkhorn_iters
        if "l" in mode:
            if cost == "fc":
                if ctx.teacher_classifier is None:
                    raise ConfigError(
                        "wkd cost 'fc' reads the teacher's classifier weights; name the teacher's "
                        "classifier in the grid or give `cost:` a K×K matrix file"
                    )
                matrix = classifier_cost(ctx.teacher_classifier.weight.detach(), sharpen)
            else:
                matrix = classifier_cost_from_file(cost, ctx.num_classes, sharpen)
            self.register_buffer("cost", matrix.to(ctx.device), persistent=False)
        if "f" in mode:
            self.ratio = ratio if ratio is not None else (4.0 if mode == "f" else 8.0)
            self.grid, self.eps = grid, eps
            s_shape, t_shape = ctx.student_shapes["stages"][-1], ctx.teacher_shapes["stages"][-1]
            _check_regions(t_shape[-2:], grid)
            self.regressor = ConvReg(s_shape, t_shape, use_relu=True)

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        assert s.logits is not None and t.logits is not None
        decay = cosine_decay(batch.epoch + 1, batch.epochs, self.decay_start * batch.epochs)
        out: dict[str, Tensor] = {}
        if "l" in self.mode:
            cost = self.cost.to(s.logits.dtype)
            target, wd = wkd_logit_terms(
                s.logits, t.logits, batch.y, cost, self.T, self.sinkhorn_lambda, self.sinkhorn_iters
            )
            out["wkd_target"], out["wkd_l"] = target, decay * wd
        if "f" in self.mode:
            mean, cov = wkd_feature_terms(self.regressor(s.stages[-1]), t.stages[-1], self.grid, self.eps)
            out["wkd_f"] = decay * (self.ratio * mean + cov)
        return out
