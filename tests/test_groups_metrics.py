"""Group metrics (WILDS conventions), the spurious-feature scan and DFR on synthetic data."""

from __future__ import annotations

import pytest
import torch

from kdbench.datasets.base import GroupInfo
from kdbench.engine.evaluation import EvalContext
from kdbench.engine.groups import feature_scan, group_family, group_metrics, scan_metrics
from kdbench.robustness.dfr import balanced_subsample, fit_dfr

INFO = GroupInfo(n_groups=4, names=["a_x", "a_z", "b_x", "b_z"], attr_names=["x", "z"], n_attr=2)


def _logits(pred: list[int], k: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), k).float()


def test_group_metrics_by_hand():
    # groups: 0 (3 samples, 2 right), 1 (1 sample, wrong), 2 (2 right), 3 (empty)
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    g = torch.tensor([0, 0, 0, 1, 2, 2])
    pred = [0, 0, 1, 1, 1, 1]
    m = group_metrics(_logits(pred), y, g, INFO, train_counts=torch.tensor([70, 10, 10, 10]))
    assert m["group/a_x/acc"] == pytest.approx(200 / 3)
    assert m["group/a_z/acc"] == 0.0 and m["group/b_x/acc"] == 100.0
    assert "group/b_z/acc" not in m and m["group/b_z/n"] == 0.0  # empty group skipped, as WILDS
    assert m["worst_group"] == 0.0
    assert m["mean_group"] == pytest.approx((200 / 3 + 0 + 100) / 3)
    assert m["avg_acc"] == pytest.approx(400 / 6)
    # train-share weighted over the groups present: (70·66.7 + 10·0 + 10·100) / 90
    assert m["adj_avg_acc"] == pytest.approx((70 * 200 / 3 + 10 * 100) / 90)


def test_teacher_decomposition_adds_up():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    g = torch.tensor([0, 0, 0, 0, 2, 2])
    s = _logits([0, 1, 1, 0, 0, 1])
    t = _logits([0, 1, 0, 1, 1, 1])
    m = group_metrics(s, y, g, INFO, teacher_logits=t)
    # group 0: student wrong at 1,2; teacher wrong at 1,3 -> inherited {1}, own {2}
    assert m["group/a_x/err_inherited"] == 25.0 and m["group/a_x/err_own"] == 25.0
    assert m["group/a_x/err_inherited"] + m["group/a_x/err_own"] == 100 - m["group/a_x/acc"]
    assert m["group/a_x/teacher_acc"] == 50.0 and m["group/a_x/agreement"] == 50.0
    assert m["group/b_x/agreement"] == 50.0 and m["group/b_x/err_own"] == 50.0


def test_family_needs_groups_and_is_cheap_per_epoch():
    y = torch.tensor([0, 1])
    meta = {"group": torch.tensor([0, 3])}
    assert group_family(_logits([0, 1]), y, meta, None, EvalContext()) == {}
    assert group_family(_logits([0, 1]), y, {}, None, EvalContext(group_info=INFO)) == {}
    cheap = group_family(_logits([0, 0]), y, meta, None, EvalContext(group_info=INFO, cheap=True))
    assert cheap == {"worst_group": 0.0, "mean_group": 50.0}
    ctx = EvalContext(group_info=INFO, train_meta={"group": torch.tensor([0, 0, 0, 3])})
    full = group_family(_logits([0, 0]), y, meta, None, ctx)
    assert full["adj_avg_acc"] == 75.0 and full["group/b_z/n"] == 1.0


def test_scan_ranks_the_attribute_dimension_first():
    gen = torch.Generator().manual_seed(0)
    n = 400
    y = torch.randint(0, 3, (n,), generator=gen)
    a = torch.randint(0, 2, (n,), generator=gen)
    f = torch.randn(n, 6, generator=gen)
    f[:, 4] += 3.0 * a  # the spurious dimension
    f[:, 1] += 3.0 * y  # a class dimension: must not count
    scores = feature_scan(f, y, a, 2)
    assert int(scores.argmax()) == 4 and scores[4] > 2.0 and scores[1] < 0.5
    m = scan_metrics(scores, top_k=3)
    assert m["scan/top1/dim"] == 4.0 and m["scan/max"] == pytest.approx(float(scores[4]))
    assert set(m) == {"scan/mean", "scan/max"} | {
        f"scan/top{r}/{k}" for r in (1, 2, 3) for k in ("dim", "score")
    }


def test_balanced_subsample_equalises_groups():
    g = torch.tensor([0] * 10 + [1] * 3 + [2] * 5)
    idx = balanced_subsample(g, torch.Generator().manual_seed(0))
    assert torch.bincount(g[idx]).tolist() == [3, 3, 3]


def _spurious_features(n: int, strength: float, gen: torch.Generator):
    """Features: dim 0 = core (noisy label signal), dim 1 = spurious attribute (clean)."""
    y = torch.randint(0, 2, (n,), generator=gen)
    aligned = torch.rand(n, generator=gen) < strength
    a = torch.where(aligned, y, 1 - y)
    core = (2 * y - 1).float() + 0.8 * torch.randn(n, generator=gen)
    spur = 2.0 * (2 * a - 1).float() + 0.1 * torch.randn(n, generator=gen)
    return torch.stack([core, spur], 1), y, y * 2 + a


def test_dfr_improves_worst_group_over_erm_on_the_same_features():
    gen = torch.Generator().manual_seed(0)
    f_tr, y_tr, g_tr = _spurious_features(2000, 0.95, gen)  # biased training data
    f_val, y_val, g_val = _spurious_features(400, 0.5, gen)  # group-balanced held-out
    f_te, y_te, g_te = _spurious_features(2000, 0.5, gen)
    info = GroupInfo(4, ["0_0", "0_1", "1_0", "1_1"], ["0", "1"], 2)
    # ERM's last layer: plain logistic regression on the biased training data
    erm = fit_dfr(f_tr, y_tr, torch.zeros_like(g_tr), 2, n_subsamples=1)
    dfr = fit_dfr(f_val, y_val, g_val, 2, n_subsamples=5)
    erm_m = group_metrics(erm(f_te), y_te, g_te, info)
    dfr_m = group_metrics(dfr(f_te), y_te, g_te, info)
    assert erm_m["worst_group"] < 60.0
    assert dfr_m["worst_group"] > erm_m["worst_group"] + 20.0
