"""Consistency training: the loss, its declared views, and the RandAugment view it trains on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench import registry
from kdbench.augment.basic import RandAugmentView
from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, MethodContext
from kdbench.methods.consistency import Consistency

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def _method(**kw) -> Consistency:
    return Consistency(MethodContext(num_classes=5, num_train=10, epochs=1, batch_size=4), **kw)


def test_loss_is_the_keras_example_kl_without_t_squared():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    batch = Batch(x=torch.zeros(4, 3, 8, 8), y=torch.zeros(4, dtype=torch.long), index=torch.arange(4))
    m = _method()
    kl = m(Features(logits=zs), Features(logits=zt), batch)["kd"]
    pt, ps = F.softmax(zt / 10, 1), F.softmax(zs / 10, 1)
    want = (pt * (pt.log() - ps.log())).sum(1).mean()  # Keras KLDivergence: batch mean of sum
    assert float(kl) == pytest.approx(float(want), rel=1e-5)
    kl2 = _method(t_squared=True)(Features(logits=zs), Features(logits=zt), batch)["kd"]
    assert float(kl2) == pytest.approx(100 * float(want), rel=1e-5)
    # (CE + KL) / 2 through the engine's weights
    assert Consistency.default_weights == {"ce": 0.5, "kd": 0.5}
    with pytest.raises(ConfigError, match="T must be > 0"):
        _method(T=0)


def test_declares_strong_student_and_clean_teacher_views():
    assert Consistency.student_view == "strong" and Consistency.teacher_view == "clean"
    assert registry.load("losses", "consistency") is Consistency


def _record_ops(aug: RandAugmentView) -> list:
    """Patch the torchvision op so every applied (op, magnitude) is recorded."""
    calls: list = []
    original = aug._op._apply_image_or_video_transform

    def spy(image, transform_id, magnitude, **kw):
        calls.append((transform_id, round(magnitude, 4)))
        return original(image, transform_id, magnitude, **kw)

    aug._op._apply_image_or_video_transform = spy
    return calls


def _images(n=12) -> torch.Tensor:
    """One structured image repeated n times, normalised with MEAN/STD."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    img = torch.stack([xx, yy, (xx * yy) ** 0.5])
    img[:, 4:8, 4:12] = 1.0
    x = (img - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return x.expand(n, 3, 16, 16).contiguous()


def test_randaugment_draws_ops_per_sample_and_a_seed_reproduces_them():
    x = _images()
    aug = RandAugmentView(num_ops=2, magnitude=9, mean=MEAN, std=STD)
    calls = _record_ops(aug)
    out = aug(x, torch.Generator().manual_seed(3))
    ops = [tuple(calls[i : i + 2]) for i in range(0, len(calls), 2)]
    assert len(ops) == len(x)  # two torchvision ops per sample
    assert ops[0] != ops[1] and len(set(ops)) > len(x) // 2  # samples of one batch differ
    assert not torch.equal(out[0], out[1])
    # a seed reproduces ops and pixels; another seed gives other ops
    calls.clear()
    again = aug(x, torch.Generator().manual_seed(3))
    assert [tuple(calls[i : i + 2]) for i in range(0, len(calls), 2)] == ops
    assert torch.equal(again, out)
    calls.clear()
    aug(x, torch.Generator().manual_seed(4))
    assert [tuple(calls[i : i + 2]) for i in range(0, len(calls), 2)] != ops


def test_randaugment_leaves_the_global_rng_and_the_input_alone():
    x = _images(4)
    before = x.clone()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    RandAugmentView(mean=MEAN, std=STD)(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(x, before)


def test_randaugment_round_trip_is_exact_in_normalised_space():
    # no ops: de-normalise, clamp to [0, 1], re-normalise gives the input back
    x = _images(3)
    out = RandAugmentView(num_ops=0, mean=MEAN, std=STD)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)
    # with ops, every pixel stays a valid image value after de-normalising
    out = RandAugmentView(num_ops=2, magnitude=9, mean=MEAN, std=STD)(x, torch.Generator().manual_seed(1))
    unit = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5 and math.isfinite(float(out.sum()))


def test_the_method_view_stacks_on_the_base_augmentation():
    """The student sees student_view(base(x)); a "clean" teacher sees base(x), the same draw."""
    from types import SimpleNamespace

    from kdbench.engine.train import StepInput, _views, clean

    x = torch.zeros(2, 1, 2, 2)
    inp = StepInput(x, torch.zeros(2), torch.arange(2), {}, 0, 1, 0, torch.Generator())
    setup = SimpleNamespace(
        base_augment=lambda x, g: x + 1, augment=lambda x, g: x * 2, teacher_augment=clean
    )
    xs, xt = _views(setup, inp)
    assert torch.equal(xs, torch.full_like(x, 2.0)) and torch.equal(xt, torch.ones_like(x))
    setup.base_augment = None  # train.augment: none: the view alone, the teacher on the raw batch
    xs, xt = _views(setup, inp)
    assert torch.equal(xs, x) and torch.equal(xt, x)


@pytest.mark.parametrize(
    ("preset", "student", "teacher"),
    [
        (None, "randaugment", "none"),
        ("repdistiller", "flip_crop + randaugment", "flip_crop"),
        ("mdistiller", "flip_crop + randaugment", "flip_crop"),
        ("quick", "randaugment", "none"),
    ],
)
def test_resolved_views_under_each_preset(tmp_path, preset, student, teacher):
    """Under a preset that augments (flip + crop) consistency's student gets RandAugment on top,
    as the Keras recipe does, instead of losing it; kd's teacher sees the student's batch."""
    from kdbench.config import load_grid
    from kdbench.engine import views
    from kdbench.runner import plan
    from tests.conftest import write_grid

    extra = f"preset: {preset}, " if preset else ""
    text = GRID.format(out=tmp_path / "runs").replace(
        "train: {{epochs: 1,".replace("{{", "{"), "train: {" + extra + "epochs: 1,", 1
    )
    text = text.replace(
        "methods: [consistency, {kd: {train: {augment: randaugment, teacher_view: clean}}}]",
        "methods: [consistency, kd]",
    )
    cells = plan(load_grid(write_grid(tmp_path / "g.yaml", text))).cells
    got = {c.method.name: views.describe(c) for c in cells}
    assert got["consistency"] == {"student": student, "teacher": teacher}
    base = "none" if teacher == "none" else teacher
    assert got["kd"] == {"student": base, "teacher": base}


def test_a_method_rows_own_views_reach_its_cells(tmp_path):
    """`- mlkd: {train: {views: {...}}}` trains that row's cells on its own views: the cells'
    `views` (what the engine builds the views from) are the row's, the other rows keep the
    grid's, and a row whose views lack one the method reads is refused before anything runs."""
    from kdbench.config import load_grid
    from kdbench.preflight import view_problems
    from kdbench.runner import plan
    from tests.conftest import write_grid

    text = GRID.format(out=tmp_path / "runs").replace(
        "methods: [consistency, {kd: {train: {augment: randaugment, teacher_view: clean}}}]",
        "methods: [mlkd, {mlkd: {train: {views: {strong: {randaugment: {num_ops: 1}}}}}}]",
    )
    cells = plan(load_grid(write_grid(tmp_path / "g.yaml", text))).cells
    ops = sorted(c.views["strong"].params["num_ops"] for c in cells)
    assert ops == [1, 2]  # the row's RandAugment with one op, the grid's default two
    assert len({c.id for c in cells}) == 2

    bad = text.replace("{strong: {randaugment: {num_ops: 1}}}", "{weak: flip_crop}")
    problems = view_problems(load_grid(write_grid(tmp_path / "bad.yaml", bad)))
    assert [p for _, p in problems] == [
        "mlkd trains on the view 'strong', which this row's train.views does not define (it has: weak); "
        "add it, e.g. `train: {views: {strong: randaugment}}`, or drop mlkd"
    ]


GRID = """
name: cons
output: {out}
datasets:
  - {{digits: {{limit: 300}}}}
pairs:
  - teacher: {{smallcnn: {{width: 4}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: [consistency, {{kd: {{train: {{augment: randaugment, teacher_view: clean}}}}}}]
seeds: [0]
train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
teacher_train: {{epochs: 2, batch_size: 64, lr: 0.05, schedule: cosine, swa: {{start: 0.5, lr: 0.01}}}}
eval: {{batch_size: 500}}
"""


@pytest.mark.slow
def test_consistency_and_strong_view_kd_with_an_swa_teacher_end_to_end(tmp_path):
    import json

    from tests.conftest import kdbench_cli, write_grid

    grid = write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs"))
    r = kdbench_cli("run", str(grid), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr + r.stdout
    run_dir = tmp_path / "runs" / "cons"
    (tdir,) = [p for p in (run_dir / "teachers").iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (tdir / "metrics.jsonl").read_text().splitlines()]
    # SWA from epoch 2 of 2: the lr drops to swa.lr and one model is averaged
    assert [r.get("swa_n") for r in rows] == [None, 1] and rows[1]["lr"] == pytest.approx(0.01)
    spec = json.loads((tdir / "config.json").read_text())
    assert spec["train"]["swa"] == {"start": 0.5, "lr": 0.01, "anneal_epochs": 1}
    results = {
        res["cell"]["method"]["label"]: res
        for res in (json.loads(p.read_text()) for p in (run_dir / "cells").glob("*/result.json"))
    }
    assert set(results) == {"consistency", "kd(train.augment=randaugment,train.teacher_view=clean)"}
    assert all(res["status"] == "done" for res in results.values())
    strong_kd = results["kd(train.augment=randaugment,train.teacher_view=clean)"]["cell"]
    assert strong_kd["augment"]["name"] == "randaugment" and strong_kd["train"]["teacher_view"] == "clean"
    assert results["consistency"]["cell"]["views"]["strong"]["name"] == "randaugment"
