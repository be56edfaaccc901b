"""The analysis toolkit: tolerant-teacher term, CKA maps, training-free ranking, plots, TensorBoard."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from kdbench.analysis.tolerant import Tolerant, top_score_difference
from tests.conftest import kdbench_cli, write_grid


def test_top_score_difference_is_the_papers_formula():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0, 2.0, -1.0], [0.0, 4.0, 4.0, 1.0, -2.0, 3.0]])
    # row 0: top-5 = 5,3,2,1,0 -> 5 - (3+2+1+0)/4 = 3.5 ; row 1: 4,4,3,1,0 -> 4 - (4+3+1+0)/4 = 2.0
    assert top_score_difference(logits, 5).item() == pytest.approx((3.5 + 2.0) / 2)
    # K = 2: the margin between the two best scores
    assert top_score_difference(logits, 2).item() == pytest.approx((2.0 + 0.0) / 2)


def test_tolerant_method_weights_the_term_by_eta():
    from kdbench.features import Features
    from kdbench.methods.base import Batch, MethodContext

    m = Tolerant(MethodContext(num_classes=6, num_train=10, epochs=1, batch_size=2), eta=0.25, k=3)
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    out = m(
        Features(logits=logits), Features(), Batch(x=torch.zeros(4), y=torch.zeros(4), index=torch.arange(4))
    )
    assert out["tolerant"].item() == pytest.approx(0.25 * top_score_difference(logits, 3).item())
    assert Tolerant.requires_teacher is False


def _train_confidence(use_tolerant: bool, epochs: int = 6) -> float:
    """Mean top-1 softmax confidence on the training set of a small CNN trained on digits."""
    from kdbench.datasets.mnist import Digits
    from kdbench.models.smallcnn import smallcnn

    torch.manual_seed(0)
    ds = Digits(limit=400).split("train")
    x, y = ds.tensors[0].float(), ds.tensors[1].long()
    model = smallcnn(num_classes=10, in_channels=1, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            logits = model(x[idx])
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            if use_tolerant:
                loss = loss + 0.6 * top_score_difference(logits, 5)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float(model(x).softmax(1).max(1).values.mean())


def test_tolerant_teacher_is_less_confident_at_equal_epochs():
    torch.set_num_threads(1)
    strict, tolerant = _train_confidence(False), _train_confidence(True)
    assert tolerant < strict - 0.05, (strict, tolerant)


ANALYSIS_GRID = """
name: ana
output: {out}
datasets:
  - {{digits: {{limit: 300}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 2}}}}
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 6}}}}
methods: [kd]
seeds: [0]
train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
eval: {{batch_size: 300}}
"""


@pytest.mark.slow
def test_cka_rank_and_plot_commands_on_a_run(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", ANALYSIS_GRID.format(out=tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "ana"
    # before any training: the CKA map of an untrained pair, and scores without measured results
    r = kdbench_cli("cka", str(grid), "--pair", "1", "--out", str(tmp_path / "a"), "--probe", "64")
    assert r.returncode == 0, r.stderr
    png, table = tmp_path / "a" / "cka_pair1.png", tmp_path / "a" / "cka_pair1.csv"
    assert png.stat().st_size > 5000
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.std() > 10  # a picture, not a blank canvas
    rows = list(csv.DictReader(open(table)))
    tt = {
        (int(r["row_layer"]), int(r["col_layer"])): float(r["cka"])
        for r in rows
        if r["matrix"] == "teacher_teacher"
    }
    n_t = int(round(len(tt) ** 0.5))
    assert n_t >= 2 and all(abs(tt[(i, i)] - 1.0) < 1e-4 for i in range(n_t))
    assert all(0.0 <= float(r["cka"]) <= 1.0 + 1e-5 for r in rows)

    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    r = kdbench_cli("rank-students", str(run_dir), "--probe", "32")
    assert r.returncode == 0, r.stderr
    assert "diswot" in r.stdout and "Kendall τ" in r.stdout and "Spearman ρ" in r.stdout
    assert "teacher untrained" not in r.stdout  # the run's trained teacher was used

    r = kdbench_cli("plot", str(run_dir))
    assert r.returncode == 0, r.stderr
    bars = run_dir / "plots" / "leaderboard.png"
    assert bars.stat().st_size > 5000


def test_rank_correlations_match_scipy():
    from scipy import stats

    from kdbench.analysis.rank import StudentScore, correlations

    scores = [
        StudentScore(
            f"t→s{i}", f"s{i}", {"diswot_sem": a, "diswot_rel": -a, "diswot": 0.0 + i, "cka": b}, True
        )
        for i, (a, b) in enumerate([(0.1, 0.9), (0.5, 0.2), (0.3, 0.4), (0.9, 0.1)])
    ]
    measured = {"t→s0": 60.0, "t→s1": 70.0, "t→s2": 65.0, "t→s3": 80.0}
    got = correlations(scores, measured)
    acc = [60.0, 70.0, 65.0, 80.0]
    assert got["diswot_sem"]["kendall_tau"] == pytest.approx(
        stats.kendalltau([0.1, 0.5, 0.3, 0.9], acc).statistic
    )
    assert got["diswot_sem"]["spearman_rho"] == pytest.approx(1.0)
    assert got["diswot_rel"]["spearman_rho"] == pytest.approx(-1.0)
    assert got["cka"]["n"] == 4
    assert json.dumps(got)  # JSON-able for --json consumers


TOLERANT_GRID = """
name: tol
output: {out}
datasets:
  - {{digits: {{limit: 400}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
    teacher_train: {{method: {{tolerant: {{eta: 0.6}}}}}}
methods: [kd]
seeds: [0]
train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
teacher_train: {{epochs: 6, batch_size: 64, lr: 0.05, schedule: cosine}}
eval: {{batch_size: 400}}
"""


@pytest.mark.slow
def test_tolerant_teacher_recipe_is_its_own_teacher_and_less_confident(tmp_path):
    from kdbench.config import load_grid
    from kdbench.datasets.mnist import Digits
    from kdbench.models.smallcnn import smallcnn
    from kdbench.runner import plan

    grid = write_grid(tmp_path / "g.yaml", TOLERANT_GRID.format(out=tmp_path / "runs"))
    p = plan(load_grid(grid))
    normal, tolerant = (c.teacher for c in p.cells)
    assert normal.id != tolerant.id  # a teacher trained another way is another teacher
    assert (
        tolerant.label == "smallcnn(width=8)[tolerant(eta=0.6,k=5)]" and normal.label == "smallcnn(width=8)"
    )
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    assert "[tolerant(eta=0.6,k=5)]" in r.stdout  # side by side: its own leaderboard column

    x = Digits(limit=400).split("train").tensors[0].float()

    def confidence(teacher_id: str) -> float:
        m = smallcnn(num_classes=10, in_channels=1, width=8)
        m.load_state_dict(torch.load(tmp_path / "runs" / "tol" / "teachers" / f"{teacher_id}.pt"))
        m.eval()
        with torch.no_grad():
            return float(m(x).softmax(1).max(1).values.mean())

    assert confidence(tolerant.id) < confidence(normal.id) - 0.05


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("train: {{epochs: 1, method: tolerant}}", "`method` belongs to `teacher_train`"),
        ("teacher_train: {{epochs: 1, method: kd}}", "kd needs a teacher"),
        ("teacher_train: {{epochs: 1, method: {{tolerant: {{k: two}}}}}}", "teacher_train.method.k"),
    ],
)
def test_teacher_recipe_method_errors(tmp_path, block, message):
    from kdbench.config import load_grid
    from kdbench.errors import ConfigError

    text = TOLERANT_GRID.format(out=tmp_path / "runs")
    key = block.split(":")[0]
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + ":")]
    lines.append(block.format())
    grid = write_grid(tmp_path / "g.yaml", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_grid(grid)
    assert message in str(e.value)


@pytest.mark.slow
def test_every_cell_writes_tensorboard_events(tiny_grid, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = kdbench_cli("run", str(tiny_grid(methods="[kd]", epochs=2)))
    assert r.returncode == 0, r.stderr
    (cell_dir,) = (tmp_path / "runs" / "tiny" / "cells").iterdir()
    acc = EventAccumulator(str(cell_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/lr", "train/loss/kd", "train/loss/ce"} <= tags
    assert [s.step for s in acc.Scalars("train/loss/kd")] == [1, 2]
