"""DFR's paper procedure (Kirichenko et al. 2023) against its reference, and the former one as an option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.errors import ConfigError
from kdbench.robustness.dfr import C_GRID, _l1_penalty, balanced_subsample, fit_dfr, standard_scaler, tune_c

sklearn = pytest.importorskip("sklearn")


def _spurious(n: int, strength: float, seed: int, noise_dims: int = 0, scale: float = 1.0):
    """dim 0 = core (noisy label signal), dim 1 = spurious attribute, then pure-noise dims."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    a = torch.where(torch.rand(n, generator=gen) < strength, y, 1 - y)
    core = (2 * y - 1).double() + 0.8 * torch.randn(n, generator=gen, dtype=torch.float64)
    spur = 2.0 * (2 * a - 1).double() + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, noise_dims, generator=gen, dtype=torch.float64)
    return scale * torch.cat([core[:, None], spur[:, None], noise], 1), y, y * 2 + a


def test_tuned_c_ignores_the_training_split_and_follows_the_held_out_split():
    f, y, g = _spurious(80, 0.5, seed=1, noise_dims=50)
    train_a, _, _ = _spurious(1000, 0.95, seed=2, noise_dims=50)
    train_b, _, _ = _spurious(300, 0.99, seed=3, noise_dims=50, scale=5.0)
    head_a = fit_dfr(f, y, g, 2, train_features=train_a, seed=0)
    head_b = fit_dfr(f, y, g, 2, train_features=train_b, seed=0)
    assert head_a.procedure == "paper" and head_a.stats == "train"
    assert head_a.C == head_b.C  # the training split only standardises the final fit
    assert not torch.allclose(head_a.mean, head_b.mean) and not torch.allclose(head_a.weight, head_b.weight)
    # a held-out split without the 50 noise dimensions wants a weaker penalty
    f2, y2, g2 = _spurious(80, 0.5, seed=1, noise_dims=0)
    assert fit_dfr(f2, y2, g2, 2, train_features=train_a[:, :2], seed=0).C == 1.0
    assert head_a.C < 1.0 and head_a.C in C_GRID


def test_tune_c_picks_the_best_worst_group_c_of_the_other_half():
    """Re-do the reference's tuning step with scikit-learn on the same split and subsample."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    f, y, g = _spurious(120, 0.5, seed=4, noise_dims=30)
    c = tune_c(f, y, g, 2, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # replay the draws tune_c makes
    perm = torch.randperm(len(y), generator=gen)
    ev, fit = perm[:60], perm[60:]
    fit = fit[balanced_subsample(g[fit], gen)]
    scaler = StandardScaler().fit(f[fit].numpy())
    worst = []
    for ci in C_GRID:
        reg = LogisticRegression(C=ci, solver="liblinear", random_state=0, **_l1_penalty())
        pred = reg.fit(scaler.transform(f[fit].numpy()), y[fit].numpy()).predict(
            scaler.transform(f[ev].numpy())
        )
        right = pred == y[ev].numpy()
        worst.append(min(right[g[ev].numpy() == k].mean() for k in np.unique(g[ev].numpy())))
    assert c == C_GRID[int(np.argmax(worst))]


def test_final_fit_is_liblinear_l1_with_training_statistics():
    from sklearn.linear_model import LogisticRegression

    f, y, g = _spurious(200, 0.5, seed=5, noise_dims=10)
    train, _, _ = _spurious(500, 0.9, seed=6, noise_dims=10)
    head = fit_dfr(f, y, g, 2, C=0.1, n_subsamples=1, train_features=train, seed=3)
    idx = balanced_subsample(g, torch.Generator().manual_seed(3))
    mean, std = standard_scaler(train)
    ref = LogisticRegression(C=0.1, solver="liblinear", random_state=3, **_l1_penalty())
    ref.fit(((f[idx] - mean) / std).numpy(), y[idx].numpy())
    assert torch.allclose(head.weight[1] - head.weight[0], torch.from_numpy(ref.coef_[0]), atol=1e-9)
    assert float(head.bias[1] - head.bias[0]) == pytest.approx(float(ref.intercept_[0]))
    assert (ref.coef_[0] == 0).sum() > 0  # L1: noise dimensions are cut
    z = ((f - mean) / std).numpy()
    assert torch.equal(head(f).argmax(1), torch.from_numpy((ref.decision_function(z) > 0).astype(np.int64)))


def test_standard_scaler_matches_scikit_learn():
    from sklearn.preprocessing import StandardScaler

    f = torch.randn(30, 4, dtype=torch.float64)
    f[:, 2] = 3.0  # constant column: scale 1, as StandardScaler
    mean, std = standard_scaler(f)
    ref = StandardScaler().fit(f.numpy())
    assert torch.allclose(mean, torch.from_numpy(ref.mean_)) and torch.allclose(
        std, torch.from_numpy(ref.scale_)
    )


def test_paper_default_averages_twenty_retrains_and_fixed_l2_keeps_the_former_procedure():
    f, y, g = _spurious(200, 0.5, seed=8, noise_dims=3)
    calls: list[int] = []
    import kdbench.robustness.dfr as dfr

    real = dfr.fit_l1_logistic

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    dfr.fit_l1_logistic = counting
    try:
        head = fit_dfr(f, y, g, 2, C=0.3)
    finally:
        dfr.fit_l1_logistic = real
    assert len(calls) == 20 and head.C == 0.3 and head.stats == "held_out"
    old = fit_dfr(f, y, g, 2, procedure="fixed_l2")
    assert old.procedure == "fixed_l2" and old.C == 1.0
    assert torch.allclose(old.std, f.std(0))  # the former: held-out statistics, sample std
    with pytest.raises(ConfigError, match="fixed_l2"):
        fit_dfr(f, y, g, 2, procedure="l3")


def test_multiclass_heads_are_one_vs_rest_logits():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(40)
    f = torch.nn.functional.one_hot(y, 3).double() * 3 + 0.3 * torch.randn(
        120, 3, generator=gen, dtype=torch.float64
    )
    head = fit_dfr(f, y, y, 3, seed=1)
    assert head.weight.shape == (3, 3) and (head(f).argmax(1) == y).double().mean() > 0.95
