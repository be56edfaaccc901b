"""The `config` augmenter (ConfiG): the confidence-guided optimisation and the dataset-level hook."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("diffusers")

from kdbench.augment import config_aug  # noqa: E402
from kdbench.augment.config_aug import ConfigAugmenter, PixelSpace, confidence_guided  # noqa: E402
from kdbench.diffusion import DiffusionModel, tiny_unet  # noqa: E402
from kdbench.diffusion.model import alphas_cumprod_from  # noqa: E402
from kdbench.engine.data import Batches  # noqa: E402
from kdbench.errors import ConfigError  # noqa: E402

SIZE, CLASSES = 16, 3
TINY_MODEL = {"steps": 3, "batch_size": 8, "warmup": 1, "widths": [8, 16], "checkpoint_every": 100}
FAST = {"steps": 6, "lr": 0.05, "ddim_steps": 4, "strength": 0.5, "batch_size": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, CLASSES)
    )


def _data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, SIZE, SIZE, generator=g), torch.randint(CLASSES, (n,), generator=g)


def _diffusion() -> DiffusionModel:
    torch.manual_seed(2)
    unet = tiny_unet(SIZE, 1, CLASSES, widths=(8, 16))
    return DiffusionModel(unet=unet, alphas_cumprod=alphas_cumprod_from({})).to("cpu")


def test_optimisation_raises_teacher_and_lowers_student_confidence():
    teacher, student = _net(0), _net(1)
    teacher.train(), student.eval()  # modes are restored afterwards
    x, y = _data(8)
    space = PixelSpace.from_range(torch.tensor([-3.0]), torch.tensor([3.0]))
    before = [p.clone() for p in student.parameters()]
    gen = confidence_guided(teacher, student, x, y, _diffusion(), space=space, **{**FAST, "steps": 10})
    c = gen.conf
    assert c["t_after"].mean() > c["t_start"].mean()
    assert c["f_after"].mean() < c["f_start"].mean()
    assert torch.equal(gen.labels, y) and gen.images.shape == x.shape
    assert teacher.training and not student.training
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert all(p.grad is None for p in student.parameters())
    s = gen.stats()
    assert s["n"] == 8 and s["images_per_s"] > 0 and s["t_after"] == pytest.approx(float(c["t_after"].mean()))
    # deterministic: the same inputs give the same images
    again = confidence_guided(teacher, student, x, y, _diffusion(), space=space, **{**FAST, "steps": 10})
    assert torch.equal(gen.images, again.images)


def _ctx(tmp_path: Path, student: nn.Module, teacher: nn.Module, epoch: int, cell: str = "c1"):
    x, y = _data()
    g = torch.arange(len(y)) % 2 + 2 * y  # a fake group id
    train = Batches(TensorDataset(x, y), 8, meta={"group": g})
    return SimpleNamespace(
        student=student,
        teacher=teacher,
        train=train,
        device=torch.device("cpu"),
        cell_dir=tmp_path / "run" / "cells" / cell,
        generator=torch.Generator().manual_seed(0),
        epoch=epoch,
        epochs=6,
    )


def test_hook_generates_rounds_saves_artefacts_and_reloads_them(tmp_path, monkeypatch):
    teacher, student = _net(0), _net(1)
    aug = ConfigAugmenter(every=2, fraction=0.25, model=TINY_MODEL, **FAST)
    ctx = _ctx(tmp_path, student, teacher, 0)
    ctx.cell_dir.mkdir(parents=True)
    assert aug.on_epoch_start(0, ctx) is None and aug.on_epoch_start(1, ctx) is None
    extra = aug.on_epoch_start(2, ctx)
    assert extra is not None and len(extra.y) == 5  # 25 % of 20
    saved = torch.load(ctx.cell_dir / "config" / "round_001.pt", weights_only=True)
    src = saved["source"]
    # the least confident samples (by default the lowest maximum softmax probability, as in the
    # paper), with their own labels and metadata
    with torch.no_grad():
        p = torch.softmax(student.eval()(ctx.train.data.tensors[0]), 1)
    assert set(src.tolist()) == set(p.amax(1).argsort()[:5].tolist())
    assert set(src.tolist()) != set(
        p.gather(1, ctx.train.targets()[:, None]).squeeze(1).argsort()[:5].tolist()
    )
    assert torch.equal(extra.y, ctx.train.targets()[src])
    assert torch.equal(extra.meta["group"], ctx.train.meta["group"][src])
    assert (ctx.cell_dir / "config" / "round_001.png").stat().st_size > 0
    rows = [json.loads(ln) for ln in (ctx.cell_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["config/n"] == 5
    assert {"config/t_after", "config/f_after", "config/t_source", "config/diffusion_train_s"} <= set(rows[0])
    # the default diffusion model is cached in the run directory, shared by cells
    assert len(list((tmp_path / "run" / "diffusion").glob("*/model.pt"))) == 1

    # resume mid-cell: a fresh augmenter (new process) reloads the round instead of generating,
    # and puts back the metrics row a resume truncated away
    (ctx.cell_dir / "metrics.jsonl").write_text("")
    monkeypatch.setattr(config_aug, "confidence_guided", lambda *a, **k: pytest.fail("regenerated"))
    resumed = ConfigAugmenter(every=2, fraction=0.25, model=TINY_MODEL, **FAST).on_epoch_start(2, ctx)
    assert torch.equal(resumed.x, extra.x) and torch.equal(resumed.y, extra.y)
    assert len((ctx.cell_dir / "metrics.jsonl").read_text().splitlines()) == 1


class _FixedStudent(nn.Module):
    """Logits looked up by the sample: the first pixel holds the sample's index."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logits = probs.log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]


def test_select_ranks_by_max_prob_by_default_or_by_the_true_label():
    probs = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # sure of class 0, label 1: true_label ranks it first, max_prob last
            [0.40, 0.35, 0.25],
            [0.34, 0.33, 0.33],  # unsure of everything: max_prob ranks it first
            [0.60, 0.20, 0.20],
        ]
    )
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([1, 0, 0, 0])
    student = _FixedStudent(probs)

    def chunks():
        yield x[:2], y[:2]
        yield x[2:], y[2:]

    pick = config_aug.least_confident
    assert pick(student, chunks, 0.5, "cpu").tolist() == [2, 1]  # the paper's: max softmax probability
    assert pick(student, chunks, 0.5, "cpu", select="max_prob").tolist() == [2, 1]
    assert pick(student, chunks, 0.5, "cpu", select="true_label").tolist() == [0, 2]
    assert ConfigAugmenter().select == "max_prob"
    assert ConfigAugmenter(select="true_label").select == "true_label"
    with pytest.raises(ConfigError, match="select must be one of max_prob, true_label, got 'entropy'"):
        ConfigAugmenter(select="entropy")


def test_a_second_cell_regenerates_the_same_images(tmp_path):
    """Generation is a function of models and data: a resume that must regenerate gets the same."""
    teacher, student = _net(0), _net(1)
    outs = []
    for cell in ("a", "b"):
        ctx = _ctx(tmp_path, student, teacher, 2, cell)
        ctx.cell_dir.mkdir(parents=True)
        outs.append(ConfigAugmenter(every=2, fraction=0.25, model=TINY_MODEL, **FAST).on_epoch_start(2, ctx))
    assert torch.equal(outs[0].x, outs[1].x)


def test_bad_settings_are_clear_errors_before_any_cell(tmp_path):
    with pytest.raises(ConfigError, match="fraction must be in"):
        ConfigAugmenter(fraction=0)
    with pytest.raises(ConfigError, match="keep must be one of"):
        ConfigAugmenter(keep="merge")
    with pytest.raises(ConfigError, match="is not a directory"):
        ConfigAugmenter(model={"path": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="unknown diffusion recipe key"):
        ConfigAugmenter(model={"stepz": 1})
    aug = ConfigAugmenter(model={"widths": [8, 16, 32]})
    aug.validate(10, 1, 28)
    with pytest.raises(ConfigError, match="cannot take 30x30"):
        aug.validate(10, 1, 30)
    with pytest.raises(ConfigError, match="teacher predicts 100 classes but the dataset has 10"):
        aug.validate(10, 1, 28, teacher_classes=100, student_classes=10)
    # a local pipeline: checked against the data from its JSON files
    unet = tiny_unet(16, 3, None, widths=(8, 16))
    unet.save_pretrained(tmp_path / "bare")
    local = ConfigAugmenter(model={"path": str(tmp_path / "bare")})
    local.validate(10, 3, 16)
    with pytest.raises(ConfigError, match="3-channel images but the dataset has 1"):
        local.validate(10, 1, 16)


def test_a_teacherless_method_is_refused(tmp_path):
    ctx = _ctx(tmp_path, _net(1), None, 2)
    ctx.cell_dir.mkdir(parents=True)
    with pytest.raises(ConfigError, match="needs a teacher"):
        ConfigAugmenter(every=2, model=TINY_MODEL, **FAST).on_epoch_start(2, ctx)


def test_accumulate_up_to_a_cap_keeps_the_newest_samples(tmp_path):
    teacher, student = _net(0), _net(1)
    aug = ConfigAugmenter(every=1, fraction=0.25, keep="accumulate", cap=7, model=TINY_MODEL, **FAST)
    ctx = _ctx(tmp_path, student, teacher, 0)
    ctx.cell_dir.mkdir(parents=True)
    first = aug.on_epoch_start(1, ctx)
    assert len(first.y) == 5 and not first.replace
    student[-1].bias.data += torch.tensor([3.0, -3.0, 0.0])  # the student changes between rounds
    second = aug.on_epoch_start(2, ctx)
    r2 = torch.load(ctx.cell_dir / "config" / "round_002.pt", weights_only=True)
    # the engine replaces its extra samples with: the last 2 of round 1, then all 5 of round 2
    assert second.replace and len(second.y) == 7
    assert torch.equal(second.x[:2], first.x[-2:]) and torch.equal(second.x[2:], r2["x"])
    uncapped = ConfigAugmenter(every=1, fraction=0.25, keep="accumulate", model=TINY_MODEL, **FAST)
    only_new = uncapped.on_epoch_start(2, ctx)  # round files exist: reloaded, not regenerated
    assert not only_new.replace and torch.equal(only_new.x, r2["x"])


def test_the_plan_refuses_misfits_before_any_cell_runs(tmp_path):
    from kdbench.config import load_grid
    from kdbench.runner import plan
    from tests.conftest import TINY_GRID, write_grid

    body = TINY_GRID.format(out=tmp_path / "runs", methods="[ce, kd]", seeds="[0]", epochs=1).replace(
        "views: {}}", "views: {}, augment: {config: {model: {widths: [8, 8, 8, 8, 8]}}}}", 1
    )
    p = plan(load_grid(write_grid(tmp_path / "grid.yaml", body)))
    msgs = {c.method.name: p.incompatible.get(c.id, "") for c in p.cells}
    assert "needs a teacher" in msgs["ce"]
    assert "cannot take 8x8 images" in msgs["kd"] and "divisible by 16" in msgs["kd"]
