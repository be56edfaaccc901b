"""Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, ICLR 2023, arXiv:2204.02937).

Keep the trained network's features, retrain only the last layer on a *group-balanced*
held-out set: draw ``n_subsamples`` subsets with the same number of samples from every
group (the smallest group's size), fit a logistic regression on the standardised
penultimate features of each, and average the weights (reference implementation:
github.com/PolinaKirichenko/deep_feature_reweighting, ``dfr_evaluate_spurious.py``). The
reference uses an L1 penalty tuned on half of the validation set; we use a fixed L2
penalty (``C`` as in scikit-learn: loss = C · Σ CE + ½‖W‖²), fitted with L-BFGS in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LastLayer:
    """A retrained linear head on standardised features: ``((f - mean) / std) @ W.T + b``."""

    weight: Tensor  # [K, D]
    bias: Tensor  # [K]
    mean: Tensor  # [D]
    std: Tensor  # [D]

    def __call__(self, features: Tensor) -> Tensor:
        z = (features.double() - self.mean) / self.std
        return (z @ self.weight.T + self.bias).float()


def balanced_subsample(group: Tensor, generator: torch.Generator) -> Tensor:
    """Indices of a subset with ``min_g |g|`` samples from every non-empty group."""
    present = torch.unique(group)
    per = min(int((group == g).sum()) for g in present)
    picks = []
    for g in present.tolist():
        idx = torch.nonzero(group == g).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per]])
    return torch.cat(picks)


def fit_logistic(
    z: Tensor,
    y: Tensor,
    num_classes: int,
    C: float = 1.0,
    max_iter: int = 100,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Multinomial L2 logistic regression (float64, L-BFGS); returns (W [K, D], b [K]).

    ``init`` warm-starts from another fit (DFR's subsamples are alike: a few iterations each).
    """
    if init is None:
        w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    else:
        w, b = (t.clone().requires_grad_(True) for t in init)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = C * F.cross_entropy(z @ w.T + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_dfr(
    features: Tensor,
    y: Tensor,
    group: Tensor,
    num_classes: int,
    n_subsamples: int = 10,
    C: float = 1.0,
    seed: int = 0,
) -> LastLayer:
    """DFR's last layer from held-out ``features`` [N, D] with labels and group ids."""
    f = features.double().flatten(1).cpu()
    y, group = y.long().cpu(), group.long().cpu()
    mean, std = f.mean(0), f.std(0).clamp_min(1e-8)
    z = (f - mean) / std
    gen = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for _ in range(n_subsamples):
        idx = balanced_subsample(group, gen)
        w, b = fit_logistic(z[idx], y[idx], num_classes, C, init=(ws[-1], bs[-1]) if ws else None)
        ws.append(w)
        bs.append(b)
    return LastLayer(torch.stack(ws).mean(0), torch.stack(bs).mean(0), mean, std)
