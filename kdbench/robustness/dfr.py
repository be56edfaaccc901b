"""Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, ICLR 2023, arXiv:2204.02937).

Keep the trained network's features, retrain only the last layer on a *group-balanced*
held-out set. Reference: github.com/PolinaKirichenko/deep_feature_reweighting,
``dfr_evaluate_spurious.py`` (``dfr_on_validation_tune`` / ``dfr_on_validation_eval``, the
DFR^Val_Tr path: ``balance_val=True``, ``add_train=False``).

``procedure="paper"`` (the default) does what the reference does:

1. **Tune C.** Shuffle the held-out split and cut it in two halves; draw a group-balanced
   subsample of the second half, standardise it with *its own* mean and std (StandardScaler,
   population std) and fit an L1-penalised logistic regression (scikit-learn, ``liblinear``:
   loss = ‖w‖₁ + C · Σ log-loss, the intercept penalised too, one-vs-rest for > 2 classes)
   for every C of :data:`C_GRID`; keep the C with the best worst-group accuracy on the first
   half (the first C of the grid on a tie). Only held-out samples enter this step.
2. **Retrain.** Standardise with the *training split's* statistics (``train_features``),
   fit 20 times with the tuned C on group-balanced subsamples of the whole held-out split,
   and average coefficients and intercepts.

The reference never seeds its RNG; here one generator seeded by ``seed`` draws every split
and subsample. ``procedure="fixed_l2"`` is kdbench's former procedure: a fixed L2 penalty
(loss = C · Σ CE + ½‖W‖², multinomial, L-BFGS in torch), 10 subsamples and the held-out
split's statistics (sample std).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import ConfigError

#: the reference's C grid (``C_OPTIONS``, WaterBirds; the CelebA one is commented out there)
C_GRID: tuple[float, ...] = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
PROCEDURES = ("paper", "fixed_l2")
Procedure = Literal["paper", "fixed_l2"]
#: number of balanced retrains averaged, per procedure
DEFAULT_SUBSAMPLES = {"paper": 20, "fixed_l2": 10}


@dataclass
class LastLayer:
    """A retrained linear head on standardised features: ``((f - mean) / std) @ W.T + b``."""

    weight: Tensor  # [K, D]
    bias: Tensor  # [K]
    mean: Tensor  # [D]
    std: Tensor  # [D]
    #: the penalty's C the head was fitted with (tuned by the paper procedure)
    C: float = 1.0
    procedure: str = "paper"
    #: which split's statistics standardise the features: "train" or "held_out"
    stats: str = "held_out"

    def __call__(self, features: Tensor) -> Tensor:
        z = (features.double().flatten(1).cpu() - self.mean) / self.std
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


def standard_scaler(f: Tensor) -> tuple[Tensor, Tensor]:
    """scikit-learn's StandardScaler statistics: mean and population std (0 -> 1)."""
    std = f.std(0, correction=0)
    return f.mean(0), torch.where(std > 0, std, torch.ones_like(std))


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


def fit_l1_logistic(z: Tensor, y: Tensor, num_classes: int, C: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The reference's ``LogisticRegression(penalty="l1", C=C, solver="liblinear")``.

    Returns (W [K, D], b [K]) as logits: a binary fit becomes ``[0, w·z + b]`` (the same
    probabilities); more classes are one-vs-rest, as liblinear did in the reference's
    scikit-learn (one binary fit per class, K decision functions); a class absent from ``y``
    gets a logit that never wins.
    """
    classes = torch.unique(y)
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64)
    b = torch.full((num_classes,), -1e9, dtype=torch.float64)
    if len(classes) == 2:
        coef, icpt = _liblinear_l1(z, (y == classes[1]).long(), C, seed)
        w[classes[1]], b[classes] = coef, torch.tensor([0.0, icpt], dtype=torch.float64)
        return w, b
    for k in classes.tolist():
        w[k], b[k] = _liblinear_l1(z, (y == k).long(), C, seed)
    return w, b


def _liblinear_l1(z: Tensor, y01: Tensor, C: float, seed: int) -> tuple[Tensor, float]:
    """One binary L1 logistic regression by liblinear: (coefficients [D], intercept)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "DFR's paper procedure fits scikit-learn's liblinear logistic regression: "
            "pip install scikit-learn (or set the DFR procedure to 'fixed_l2')"
        ) from e
    reg = LogisticRegression(C=C, solver="liblinear", random_state=seed, **_l1_penalty())
    reg.fit(z.numpy(), y01.numpy())
    return torch.from_numpy(reg.coef_[0]).double(), float(reg.intercept_[0])


def _l1_penalty() -> dict:
    """scikit-learn >= 1.8 spells the L1 penalty ``l1_ratio=1`` (``penalty`` is deprecated)."""
    import sklearn

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def _worst_group_acc(logits: Tensor, y: Tensor, group: Tensor) -> float:
    right = (logits.argmax(1) == y).double()
    return min(float(right[group == g].mean()) for g in torch.unique(group))


def tune_c(
    f: Tensor,
    y: Tensor,
    group: Tensor,
    num_classes: int,
    generator: torch.Generator,
    grid: tuple[float, ...] = C_GRID,
    seed: int = 0,
) -> float:
    """The C of ``grid`` with the best worst-group accuracy, fitted on a balanced subsample of
    one half of the held-out split and scored on the other half (held-out samples only)."""
    perm = torch.randperm(len(y), generator=generator)
    n_eval = len(y) // 2
    ev, fit = perm[:n_eval], perm[n_eval:]
    fit = fit[balanced_subsample(group[fit], generator)]
    mean, std = standard_scaler(f[fit])
    z_fit, z_ev = (f[fit] - mean) / std, (f[ev] - mean) / std
    best_c, best_acc = grid[0], -1.0
    for c in grid:
        w, b = fit_l1_logistic(z_fit, y[fit], num_classes, c, seed)
        acc = _worst_group_acc(z_ev @ w.T + b, y[ev], group[ev])
        if acc > best_acc:  # strict: the first C of the grid wins a tie, as np.argmax
            best_c, best_acc = c, acc
    return best_c


def fit_dfr(
    features: Tensor,
    y: Tensor,
    group: Tensor,
    num_classes: int,
    n_subsamples: int | None = None,
    C: float | None = None,
    seed: int = 0,
    procedure: Procedure = "paper",
    train_features: Tensor | None = None,
    c_grid: tuple[float, ...] = C_GRID,
) -> LastLayer:
    """DFR's last layer from held-out ``features`` [N, D] with labels and group ids.

    ``train_features`` (the training split's features) give the standardisation of the paper
    procedure's final fit; without them the held-out split's statistics are used
    (``LastLayer.stats`` says which). ``C`` skips the paper procedure's tuning when given.
    """
    if procedure not in PROCEDURES:
        raise ConfigError(f"DFR procedure must be one of {', '.join(PROCEDURES)}, got {procedure!r}")
    f = features.double().flatten(1).cpu()
    y, group = y.long().cpu(), group.long().cpu()
    n = DEFAULT_SUBSAMPLES[procedure] if n_subsamples is None else n_subsamples
    gen = torch.Generator().manual_seed(seed)
    if procedure == "fixed_l2":
        return _fit_fixed_l2(f, y, group, num_classes, n, 1.0 if C is None else C, gen)
    if C is None:
        C = tune_c(f, y, group, num_classes, gen, c_grid, seed)
    stats = "held_out" if train_features is None else "train"
    mean, std = standard_scaler(f if train_features is None else train_features.double().flatten(1).cpu())
    z = (f - mean) / std
    ws, bs = [], []
    for _ in range(n):
        idx = balanced_subsample(group, gen)
        w, b = fit_l1_logistic(z[idx], y[idx], num_classes, C, seed)
        ws.append(w)
        bs.append(b)
    return LastLayer(torch.stack(ws).mean(0), torch.stack(bs).mean(0), mean, std, C, procedure, stats)


def _fit_fixed_l2(
    f: Tensor, y: Tensor, group: Tensor, num_classes: int, n: int, C: float, gen: torch.Generator
) -> LastLayer:
    """kdbench's former DFR: fixed L2 penalty, held-out statistics (sample std)."""
    mean, std = f.mean(0), f.std(0).clamp_min(1e-8)
    z = (f - mean) / std
    ws, bs = [], []
    for _ in range(n):
        idx = balanced_subsample(group, gen)
        w, b = fit_logistic(z[idx], y[idx], num_classes, C, init=(ws[-1], bs[-1]) if ws else None)
        ws.append(w)
        bs.append(b)
    return LastLayer(torch.stack(ws).mean(0), torch.stack(bs).mean(0), mean, std, C, "fixed_l2", "held_out")
