"""Spurious mAUC: the AUC maths against scikit-learn, and the metric through an ImageNet-layout
tree with ``spurious_images/`` (known answers), the evaluation pass and a grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from kdbench.datasets.folder import ImageFolderDataset
from kdbench.engine import evaluation as ev
from kdbench.engine.cell import cell_data
from kdbench.errors import DataError
from kdbench.metric_defs import metric_info, split_metric
from kdbench.robustness.spurious_auc import average_precision, roc_auc, spurious_metrics
from tests.conftest import kdbench_cli, write_grid

# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_ap_match_scikit_learn(ties: bool):
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.normal(0.3, 1, rng.integers(1, 30)), rng.normal(0, 1, rng.integers(1, 30))
        if ties:  # few distinct values: many ties within and across the two sets
            pos, neg = np.round(pos), np.round(neg)
        truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        scores = np.r_[pos, neg]
        assert roc_auc(pos, neg) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
        assert average_precision(pos, neg) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


def test_spurious_metrics_per_class_softmax_scores_match_the_reference_procedure():
    """Per class k: softmax column k of class-k test images vs class-k spurious-only images."""
    g = torch.Generator().manual_seed(1)
    n_classes = 5
    in_logits, in_y = torch.randn(60, n_classes, generator=g), torch.arange(60) % n_classes
    sp_logits, sp_y = torch.randn(40, n_classes, generator=g), torch.tensor([0, 2, 3] * 13 + [0])
    in_logits[in_y == 4] += 3.0  # a class without spurious images plays no part
    out = spurious_metrics(in_logits, in_y, sp_logits, sp_y)
    in_p, sp_p = in_logits.double().softmax(1).numpy(), sp_logits.double().softmax(1).numpy()
    aucs, aps = [], []
    for k in (0, 2, 3):
        pos, neg = in_p[in_y.numpy() == k, k], sp_p[sp_y.numpy() == k, k]
        truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        aucs.append(roc_auc_score(truth, np.r_[pos, neg]))
        aps.append(average_precision_score(truth, np.r_[pos, neg]))
        assert out[f"class/{k}/auc"] == pytest.approx(aucs[-1])
    assert out["mauc"] == pytest.approx(np.mean(aucs)) and out["mean_ap"] == pytest.approx(np.mean(aps))
    assert out["auc_classes"] == 3 and "class/4/auc" not in out and "class/1/auc" not in out
    # the score is the softmax probability, not the logit: a constant added to an image's
    # logits changes nothing ...
    shifted = in_logits.clone()
    shifted[:7] += 10.0
    assert spurious_metrics(shifted, in_y, sp_logits, sp_y)["mauc"] == pytest.approx(out["mauc"])
    # ... and a test image with the lower class logit can still have the higher probability
    pos, neg = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[3.0, 3.0, 0.0]])
    assert spurious_metrics(pos, torch.tensor([0]), neg, torch.tensor([0]))["mauc"] == 1.0


def test_known_answers_perfect_reversed_constant_and_fraction_predicted_as_class():
    in_y = torch.tensor([0, 0, 1, 1, 1])
    sp_y = torch.tensor([0, 0, 0, 1, 1])
    # each test image is confidently its class; spurious-only images are not: AUC 1 per class
    in_logits = torch.nn.functional.one_hot(in_y, 2).float() * 4
    # spurious-only images: less confident, some predicted as their feature's class
    sp_logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.5]])
    good = spurious_metrics(in_logits, in_y, sp_logits, sp_y)
    assert good["mauc"] == 1.0 and good["mean_ap"] == 1.0
    # class 0: 1 of its 3 spurious-only images predicted as 0; class 1: 1 of 2 predicted as 1
    assert good["as_class"] == pytest.approx((100 / 3 + 50) / 2)
    # the feature alone convinces more than the object: 0
    bad = spurious_metrics(torch.zeros(5, 2), in_y, torch.nn.functional.one_hot(sp_y, 2).float() * 4, sp_y)
    assert bad["mauc"] == 0.0
    flat = spurious_metrics(torch.zeros(5, 2), in_y, torch.zeros(5, 2), sp_y)
    assert flat["mauc"] == 0.5
    # no test image of the spurious images' class: nothing to compare
    assert spurious_metrics(in_logits[in_y == 1], in_y[in_y == 1], sp_logits[:3], sp_y[:3]) == {}


def test_metrics_are_declared_with_their_direction():
    assert split_metric("spurious/mauc") == ("spurious", "mauc")
    assert split_metric("spurious/class/12/auc") == ("spurious", "class/12/auc")
    assert metric_info("spurious/mauc").higher_is_better
    assert not metric_info("spurious/as_class").higher_is_better
    assert metric_info("spurious/auc_classes").aggregate == "last"


# ----------------------------------------------------------------------------- through the data

#: grey level of each kind of image: class "a" bright, "b" dark; their spurious-only images between
LEVELS = {("test", "a"): 230, ("test", "b"): 30, ("spurious_images", "a"): 140, ("spurious_images", "b"): 110}


def make_tree(root: Path, n: int = 3) -> Path:
    """ImageNet layout (train/, test/) plus spurious_images/<class>/ beside it, real PNG files."""
    for split in ("train", "test", "spurious_images"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            level = LEVELS.get((split, cls), 128)
            for k in range(n + (split == "spurious_images")):
                Image.new("RGB", (20, 16), (level, level, level + k)).save(d / f"{k}.png")
    return root


def brightness(x: torch.Tensor) -> torch.Tensor:
    """A 'model' whose class-a logit rises with brightness: it tells the object from the feature."""
    s = x.mean((1, 2, 3))
    return torch.stack([s, -s], 1)


def test_spurious_images_form_an_eval_set_and_the_pass_scores_them(tmp_path: Path):
    root = make_tree(tmp_path / "in")
    data = cell_data({"name": "imagefolder", "params": {"root": str(root), "image_size": 8}}, 4, 16)
    sets = data.eval_sets()
    assert set(sets) == {"test", "spurious"} and len(sets["spurious"].batches) == 8
    assert sets["spurious"].targets().tolist() == [0] * 4 + [1] * 4
    ctx = data.context(15)
    cpu = torch.device("cpu")

    def metrics(fn, teacher=None) -> dict[str, float]:
        return ev.final_metrics(ev.evaluate(fn, sets, cpu, ctx, teacher=teacher))

    good = metrics(brightness, ev.TeacherLogits(lambda x: -brightness(x), cpu, None))
    assert good["spurious/mauc"] == 1.0 and good["spurious/auc_classes"] == 2
    assert good["spurious/class/0/auc"] == 1.0 and good["top1"] == 100.0
    assert good["spurious/teacher_mauc"] == 0.0  # the teacher's logits, against its own test logits
    # the images do not show their label's object: no accuracy, NLL or agreement on them
    assert not any(k.startswith("spurious/") and k.endswith(("top1", "nll", "agreement")) for k in good)
    assert metrics(lambda x: -brightness(x))["spurious/mauc"] == 0.0
    assert metrics(lambda x: torch.zeros(len(x), 2))["spurious/mauc"] == 0.5
    # the per-epoch (cheap) pass skips them
    cheap = ev.evaluate(brightness, sets, cpu, ctx, cheap=True)
    assert "mauc" not in cheap.get("spurious", {})


def test_spurious_folder_names_errors_and_fingerprint(tmp_path: Path):
    root = make_tree(tmp_path / "in")
    ds = ImageFolderDataset(root=str(root), image_size=8)
    fp = ds.fingerprint()
    assert fp["spurious"]["size"] == 8
    plain = make_tree(tmp_path / "plain")
    shutil.rmtree(plain / "spurious_images")
    no_sp = ImageFolderDataset(root=str(plain), image_size=8)
    assert no_sp.eval_splits() == {} and "spurious" not in no_sp.fingerprint()
    # the Spurious ImageNet release's folder names: class index in field 3, component last
    (root / "spurious_images" / "b").rename(root / "spurious_images" / "spurious_imagenet_1_comp_0")
    again = ImageFolderDataset(root=str(root), image_size=8)
    assert [y for _, y in again.eval_splits()["spurious"].samples] == [0] * 4 + [1] * 4
    assert again.fingerprint()["spurious"]["files"] != fp["spurious"]["files"]
    assert again.meta("spurious")["spurious_only"].all() and again.meta("test") == {}
    (root / "spurious_images" / "zebra").mkdir()
    with pytest.raises(DataError, match="name no class of train/: zebra"):
        ImageFolderDataset(root=str(root), image_size=8).eval_splits()
    (root / "spurious_images" / "zebra").rename(root / "spurious_images" / "x_y_7_c_1")
    with pytest.raises(DataError, match="class index 7 is out of range"):
        ImageFolderDataset(root=str(root), image_size=8).eval_splits()


GRID = """
name: spur
output: {out}
datasets:
  - {{imagefolder: {{root: {root}, image_size: 8}}}}
pairs:
  - teacher: {{smallcnn: {{width: 4}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: [kd]
train: {{epochs: 1, batch_size: 4, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 16}}
"""


@pytest.mark.slow
def test_a_grid_records_and_reports_the_spurious_mauc(tmp_path: Path):
    root = make_tree(tmp_path / "in")
    grid = write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs", root=root))
    env = {"OMP_NUM_THREADS": "1"}
    r = kdbench_cli("run", str(grid), env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    m = json.loads(next((tmp_path / "runs" / "spur" / "cells").glob("*/result.json")).read_text())["metrics"]
    assert 0.0 <= m["spurious/mauc"] <= 1.0 and m["spurious/auc_classes"] == 2.0
    assert "spurious/teacher_mauc" in m and "spurious/top1" not in m
    rep = kdbench_cli("report", str(tmp_path / "runs" / "spur"), "--metric", "spurious/mauc", env=env)
    assert rep.returncode == 0, rep.stderr
    assert "spurious mAUC ↑" in rep.stdout and f"{m['spurious/mauc']:.2f}" in rep.stdout
