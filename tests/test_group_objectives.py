"""Model-centric group robustness: group DRO (as a CE objective and a method) and JTT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdbench.artifacts import load_checkpoint
from kdbench.cells import TrainRecipe
from kdbench.config import load_grid
from kdbench.engine.cell import cell_data, obtain_teacher, run_cell
from kdbench.engine.data import Batches
from kdbench.errors import ConfigError
from kdbench.methods.groupdro import GroupDRO, build_objective, check_objective
from kdbench.robustness.jtt import CACHE, identification_spec, upsample
from kdbench.runner import plan
from tests.conftest import write_grid

# ------------------------------------------------------------------------------ group DRO


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three samples, label 0: CE ln 2 and ln 4/3 (group 0), ln 4 (group 1); group 2 absent."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)]], dtype=torch.float64)
    return logits, torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1])


def test_group_weights_follow_the_exponentiated_gradient_update_by_hand():
    logits, y, g = _batch()
    dro = GroupDRO(torch.tensor([4, 1, 0]), step_size=0.5).double()
    assert dro.q.tolist() == pytest.approx([1 / 3] * 3)
    loss = dro(logits, y, g)
    # L = (ln(8/3)/2, ln 4, 0); q ∝ (1/3)·exp(0.5 L) = ((8/3)^(1/4), 2, 1) / 3, normalised
    L0, L1 = math.log(8 / 3) / 2, math.log(4)
    z = (8 / 3) ** 0.25 + 2 + 1
    q1 = [(8 / 3) ** 0.25 / z, 2 / z, 1 / z]
    assert dro.q.tolist() == pytest.approx(q1, rel=1e-12)
    # the loss uses the updated q, and q is a constant for the gradient
    assert float(loss) == pytest.approx(q1[0] * L0 + q1[1] * L1, rel=1e-12)
    # a second batch multiplies in again: q ∝ q1 · exp(0.5 L)
    dro(logits, y, g)
    q2 = [q1[0] * (8 / 3) ** 0.25, q1[1] * 2, q1[2]]
    assert dro.q.tolist() == pytest.approx([v / sum(q2) for v in q2], rel=1e-12)


def test_group_adjustment_enters_the_update_not_the_gradient():
    logits, y, g = _batch()
    dro = GroupDRO(torch.tensor([4, 1, 0]), step_size=0.5, adjustment=1.0).double()
    leaf = logits.clone().requires_grad_(True)
    loss = dro(leaf, y, g)
    # C/sqrt(n_g) = (1/2, 1, 0) (an empty group gets none): q ∝ ((8/3)^(1/4) e^(1/4), 2 e^(1/2), 1)
    raw = [(8 / 3) ** 0.25 * math.exp(0.25), 2 * math.exp(0.5), 1.0]
    q = [v / sum(raw) for v in raw]
    assert dro.q.tolist() == pytest.approx(q, rel=1e-12)
    loss.backward()
    # d loss / d logits_i = q_g(i) / n_g(i) · (softmax_i − onehot_i)
    p = F.softmax(logits, 1)
    onehot = F.one_hot(y, 2).double()
    scale = torch.tensor([q[0] / 2, q[0] / 2, q[1]], dtype=torch.float64)[:, None]
    assert torch.allclose(leaf.grad, scale * (p - onehot), rtol=1e-12)


def test_samples_of_unknown_group_stay_out_of_the_loss():
    logits, y, g = _batch()
    dro = GroupDRO(torch.tensor([4, 1, 0]), step_size=0.5).double()
    ref = GroupDRO(torch.tensor([4, 1, 0]), step_size=0.5).double()
    extra = torch.tensor([[5.0, -5.0]], dtype=torch.float64)
    loss = dro(
        torch.cat([logits, extra]), torch.cat([y, torch.tensor([1])]), torch.cat([g, torch.tensor([-1])])
    )
    assert float(loss) == pytest.approx(float(ref(logits, y, g)), rel=1e-12)
    assert torch.equal(dro.q, ref.q)


def test_objective_settings_resolve_and_bad_ones_are_refused():
    full = {"name": "groupdro", "params": {"step_size": 0.01, "adjustment": 0.0}}
    assert check_objective("groupdro") == full
    assert check_objective({"groupdro": {"adjustment": 2}})["params"] == {
        "step_size": 0.01,
        "adjustment": 2.0,
    }
    assert check_objective(full) == full and check_objective("ce") is None
    for bad in ("dro", {"groupdro": {"eta": 1}}, {"groupdro": {"step_size": 0}}):
        with pytest.raises(ValueError):
            check_objective(bad)
    # a recipe leaving both keys unset dumps as before (cell ids of existing grids unchanged)
    assert "objective" not in TrainRecipe().to_dict() and "jtt" not in TrainRecipe().to_dict()
    assert TrainRecipe(objective="groupdro").objective == full
    with pytest.raises(ValueError, match="gpus_per_cell"):
        TrainRecipe(objective="groupdro", gpus_per_cell=2)
    with pytest.raises(ConfigError, match="groups"):
        build_objective("groupdro", None)


# ------------------------------------------------------------------------------ JTT sampling


def test_upweighted_epoch_draws_the_error_set_one_plus_lambda_times():
    data = torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long))
    b = Batches(data, batch_size=4)
    b.upweight = (torch.tensor([2, 7]), 3)
    order = b.order(torch.Generator().manual_seed(0))
    counts = torch.bincount(order, minlength=10)
    assert counts.tolist() == [1, 1, 4, 1, 1, 1, 1, 4, 1, 1]
    assert torch.equal(order, b.order(torch.Generator().manual_seed(0)))  # seeded
    assert torch.equal(b.order(None), torch.arange(10))  # evaluation: every sample once, in order
    assert sum(len(i) for _, _, i in b.iterate(torch.Generator().manual_seed(1))) == 16
    with pytest.raises(ConfigError, match="shuffle"):
        b.order(torch.Generator(), sampler="group_balanced")


# ------------------------------------------------------------------------------ end to end

GRID = """
name: robust
output: {out}
datasets:
  - {{spurious: {{base: digits, strength: 0.95, n_attr: 2, val_fraction: 0.2}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: {methods}
seeds: {seeds}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500, val_fraction: 0.2}}
"""


def _cells(tmp_path: Path, methods: str, seeds: str = "[0]", epochs: int = 2):
    body = GRID.format(out=tmp_path / "runs", methods=methods, seeds=seeds, epochs=epochs)
    return plan(load_grid(write_grid(tmp_path / "g.yaml", body))).cells


def test_jtt_error_set_is_exactly_the_misclassified_training_samples_and_stage1_is_shared(tmp_path):
    torch.set_num_threads(1)
    methods = "[{jtt: {epochs: 1, lambda_up: 4}}, {kd: {train: {jtt: {epochs: 1, lambda_up: 4}}}}]"
    cells = _cells(tmp_path, methods, seeds="[0, 1]")
    run_dir, dev = tmp_path / "runs" / "robust", torch.device("cpu")
    jtt = {"epochs": 1, "lambda_up": 4, "seed": 0}
    # every method and seed shares one stage-1 model
    assert len({identification_spec(c, jtt).id for c in cells}) == 1
    cell = cells[0]
    data = cell_data(cell.dataset, 64, 500, cell.eval.val_fraction)
    summary = upsample(cell, jtt, data.train, run_dir, dev, obtain_teacher=obtain_teacher)
    spec = identification_spec(cell, jtt)
    weights = run_dir / CACHE / f"{spec.id}.pt"
    assert weights.exists() and not (run_dir / "teachers").exists()
    # independently: the stage-1 model's predictions on every training sample (no augmentation)
    model, _ = obtain_teacher(spec, run_dir, dev, cache=CACHE)
    ds = data.ds.split("train")
    rows = data.train.indices if data.train.indices is not None else torch.arange(len(ds))
    x, y = ds[rows]
    with torch.no_grad():
        wrong = (model(x.float()).argmax(1) != y).nonzero().flatten()
    assert 0 < len(wrong) < len(rows)
    positions, copies = data.train.upweight
    assert torch.equal(positions, wrong) and copies == 4
    assert summary["error_set_size"] == len(wrong) and summary["epoch_size"] == len(rows) + 4 * len(wrong)
    saved = json.loads((run_dir / CACHE / spec.id / "error_set.json").read_text())
    assert saved["positions"] == wrong.tolist()
    # a second cell (another seed and method) reuses the cached stage 1 without training it again
    mtime = weights.stat().st_mtime_ns
    other = cell_data(cells[-1].dataset, 64, 500, cells[-1].eval.val_fraction)
    upsample(cells[-1], jtt, other.train, run_dir, dev, obtain_teacher=obtain_teacher)
    assert weights.stat().st_mtime_ns == mtime and torch.equal(other.train.upweight[0], wrong)


@pytest.mark.slow
def test_groupdro_and_jtt_train_end_to_end_on_spurious(tmp_path):
    torch.set_num_threads(1)
    methods = (
        "[groupdro, {jtt: {epochs: 1, lambda_up: 3}},"
        " {kd: {train: {objective: {groupdro: {adjustment: 1}}}}},"
        " {kd: {train: {jtt: {epochs: 1, lambda_up: 3}}}}]"
    )
    cells = _cells(tmp_path, methods, epochs=2)
    run_dir = tmp_path / "runs" / "robust"
    labels = [c.method.label for c in cells]
    assert labels[0] == "groupdro" and labels[1] == "jtt(epochs=1,lambda_up=3)"
    results = {c.method.label: run_cell(c, run_dir) for c in cells}
    for label, r in results.items():
        assert r.status == "done", (label, r.error)
        assert 0 <= r.metrics["worst_group"] <= r.metrics["mean_group"] <= 100
    # the group weights the cells ended with: a distribution over the 10 x 2 groups, moved off
    # uniform (which way early on depends on how often each group is in a batch: an absent
    # group's loss enters the update as 0, as in the reference)
    for label in ("groupdro", labels[2]):
        q = torch.tensor(results[label].summary["objective_q"])
        assert len(q) == 20 and float(q.sum()) == pytest.approx(1, abs=1e-5)
        assert float(q.max() / q.min()) > 1.1
    # both JTT cells upsampled the same error set of the one stage-1 model
    a, b = results[labels[1]].summary["jtt"], results[labels[3]].summary["jtt"]
    assert a == b and a["error_set_size"] > 0 and len(list((run_dir / CACHE).glob("*.pt"))) == 1


def test_groupdro_weights_survive_checkpoint_and_resume(tmp_path):
    torch.set_num_threads(1)
    cell = _cells(tmp_path, "[{kd: {train: {objective: {groupdro: {step_size: 0.5}}}}}]", epochs=3)[0]

    def stop_after_epoch_one(row: dict) -> None:
        if row.get("stage") == "train" and row.get("epoch") == 1:
            raise KeyboardInterrupt  # the checkpoint after epoch 1 is written before this hook

    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, tmp_path / "a", progress=stop_after_epoch_one)
    ckpt = load_checkpoint(tmp_path / "a" / "cells" / cell.id / "checkpoint.pt")
    q = ckpt["objective"]["q"]
    assert ckpt["epoch"] == 1 and not torch.allclose(q, torch.full_like(q, 1 / len(q)))
    resumed = run_cell(cell, tmp_path / "a")
    straight = run_cell(cell, tmp_path / "b")
    assert resumed.status == straight.status == "done"
    assert resumed.summary["objective_q"] == straight.summary["objective_q"]
    a = torch.load(tmp_path / "a" / "cells" / cell.id / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "cells" / cell.id / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["worst_group"] == straight.metrics["worst_group"]


def test_grid_errors_name_the_line_and_a_method_row_may_not_contradict_its_method(tmp_path):
    body = GRID.format(
        out=tmp_path / "runs",
        methods="[{groupdro: {step_size: 0}}, {kd: {train: {objective: dro}}}]",
        seeds="[0]",
        epochs=1,
    )
    bad = write_grid(tmp_path / "bad.yaml", body + "\n")
    with pytest.raises(ConfigError) as e:
        load_grid(bad)
    text = str(e.value)
    assert "bad.yaml:9: methods[0].groupdro: objective groupdro: step_size must be > 0" in text
    assert "unknown objective 'dro'" in text
    teacher_jtt = body.replace("teacher_train: {", "teacher_train: {jtt: {epochs: 1}, ")
    with pytest.raises(ConfigError, match="teacher_train.jtt: has no effect here"):
        load_grid(write_grid(tmp_path / "t.yaml", teacher_jtt))
    # the method groupdro with a contradicting train.objective fails its cell with the reason
    cell = _cells(tmp_path, "[{groupdro: {train: {objective: {groupdro: {step_size: 0.5}}}}}]")[0]
    result = run_cell(cell, tmp_path / "runs" / "robust")
    assert result.status == "failed" and "contradicts" in result.error


@pytest.mark.slow
def test_groupdro_and_jtt_combine_with_config_in_one_row(tmp_path):
    pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    config = (
        "{config: {every: 1, fraction: 0.05, steps: 2, ddim_steps: 4, batch_size: 16,"
        " model: {steps: 5, widths: [8, 16], batch_size: 16}}}"
    )
    methods = (
        f"[{{kd: {{train: {{objective: groupdro, augment: {config}}}}}}},"
        f" {{kd: {{train: {{jtt: {{epochs: 1, lambda_up: 3}}, augment: {config}}}}}}}]"
    )
    cells = _cells(tmp_path, methods, epochs=2)
    run_dir = tmp_path / "runs" / "robust"
    for cell in cells:
        result = run_cell(cell, run_dir)
        assert result.status == "done", result.error
        cdir = run_dir / "cells" / cell.id
        assert (cdir / "extra" / "epoch0001-0.pt").exists()  # ConfiG's round joined the training set
    # stage 1 of JTT trained without ConfiG's generated samples (a plain ERM model)
    stage1 = json.loads(next((run_dir / CACHE).glob("*/result.json")).read_text())
    assert stage1["teacher"]["augment"]["name"] == "none"
