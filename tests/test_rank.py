"""Training-free ranking scores on hand-computed cases, and DisWOT's against its reference code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdbench.analysis.rank import (
    cka_score,
    classifier_grad,
    grad_cam,
    relation_score,
    relation_score_frobenius,
    semantic_score,
)
from kdbench.errors import KdbenchError
from kdbench.features import TapSpec

FIXTURE = Path(__file__).parent / "fixtures" / "diswot_reference.json"


class _GapNet(nn.Module):
    """stage = identity on the input map, then global average pooling and a linear classifier."""

    def __init__(self, weight: torch.Tensor, with_bn: bool = False):
        super().__init__()
        self.stage = nn.BatchNorm2d(weight.shape[1], affine=False) if with_bn else nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
        self.kd_taps = TapSpec(stages=("stage",), classifier="fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(x).mean(dim=(2, 3)))


def test_grad_cam_by_hand():
    # logit_y = Σ_c W[y, c] · mean(a_c): the gradient per position is W[y, c] / (H W), so the
    # map is relu(Σ_c W[y, c] / (H W) · a_c)
    w = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    x = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[1.0, 0.0], [1.0, 0.0]]]], requires_grad=True)
    model = _GapNet(w)
    cam0 = grad_cam(model, model.kd_taps, x, torch.tensor([0]))
    cam1 = grad_cam(model, model.kd_taps, x, torch.tensor([1]))
    # class 0: (1·a0 − 2·a1) / 4 = [[-1, 2], [-2, -1]] / 4 → relu
    assert torch.allclose(cam0[0], torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
    # class 1: (0.5·a0 + a1) / 4 = [[1.5, 1], [1, -0.5]] / 4 → relu
    assert torch.allclose(cam1[0], torch.tensor([[0.375, 0.25], [0.25, 0.0]]))


def test_semantic_score_by_hand():
    # one class, two channels: rows of g gᵀ normalised are sign(g_i)·g/‖g‖
    # teacher g = [1, 1]: both rows [1, 1]/√2; student g = [1, −1]: rows [1, −1]/√2, [−1, 1]/√2
    # squared differences 2 + 2, over C·K = 2
    assert semantic_score(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, -1.0]])) == pytest.approx(-2.0)
    g = torch.randn(4, 3)
    assert semantic_score(g, 3 * g) == pytest.approx(0.0, abs=1e-12)  # scale-free per class
    with pytest.raises(KdbenchError, match="classes"):
        semantic_score(torch.randn(4, 3), torch.randn(5, 3))


def test_relation_score_by_hand():
    # B = 2: teacher Gram I; student rows identical: normalised Gram all 1/√2
    # Σ (I − 1/√2)² = 2 (1 − 1/√2)² + 2 · ½ = 4 − 2√2, over B² = 4
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert relation_score(f_t, f_s) == pytest.approx(-(4 - 2 * math.sqrt(2)) / 4)
    # the former variant: the Frobenius norm, no division
    assert relation_score_frobenius(f_t, f_s) == pytest.approx(-math.sqrt(4 - 2 * math.sqrt(2)))


def test_cka_score_by_hand():
    # x and y centred and orthogonal: CKA(x, x) = 1, CKA(x, y) = 0
    x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    y = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    # teacher stages [x, y], student [2x]: best per teacher stage [1, 0], mean 0.5
    assert cka_score([x, y], [2 * x]) == pytest.approx(0.5)
    assert cka_score([x, y], [2 * x, -y]) == pytest.approx(1.0)


def test_classifier_grad_is_the_mean_cross_entropy_gradient_and_leaves_the_model_alone():
    torch.manual_seed(0)
    w = torch.randn(3, 2)
    model = _GapNet(w, with_bn=True).eval()
    x, y = 2 + 3 * torch.randn(5, 2, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    before = model.stage.running_mean.clone()
    pooled, g = classifier_grad(model, model.kd_taps, x, y)
    # training-mode BN: the pooled features are the batch-normalised maps' means
    z = torch.nn.functional.batch_norm(x, None, None, training=True).mean(dim=(2, 3))
    assert torch.allclose(pooled, z, atol=1e-5)
    p = torch.softmax(z @ w.T, 1)
    expected = (p - torch.nn.functional.one_hot(y, 3).float()).T @ z / 5
    assert torch.allclose(g, expected, atol=1e-5)
    assert not model.training and torch.equal(model.stage.running_mean, before)


@pytest.mark.parametrize("case", json.loads(FIXTURE.read_text())["cases"], ids=lambda c: c["name"])
def test_diswot_scores_match_the_reference_code(case):
    if case["kind"] == "semantic":
        got = semantic_score(torch.tensor(case["g_t"]), torch.tensor(case["g_s"]))
    else:
        got = relation_score(torch.tensor(case["f_t"]), torch.tensor(case["f_s"]))
    assert got == pytest.approx(case["score"], rel=1e-5)
