"""ConfiG's diffusion model trained on data of its own (``model: {dataset: SPEC}``): what it trains
on, how it is cached, and how a spec that cannot work is refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from kdbench import registry  # noqa: E402
from kdbench.augment.config_aug import ConfigAugmenter  # noqa: E402
from kdbench.config import load_grid  # noqa: E402
from kdbench.diffusion.train import CODE_VERSION, Recipe, data_digest, model_key  # noqa: E402
from kdbench.engine.cell import load_dataset  # noqa: E402
from kdbench.engine.data import Batches  # noqa: E402
from kdbench.errors import ConfigError  # noqa: E402
from kdbench.grid import expand  # noqa: E402
from tests.conftest import write_grid  # noqa: E402

#: a spurious set on 8x8 digits (packaged, offline): biased for the student, balanced for the generator
BASE = {"digits": {"limit": 240}}
BIASED = {"base": BASE, "kind": "background", "strength": 0.9, "n_attr": 2}
BALANCED = {"spurious": {**BIASED, "variant": "balanced"}}
TINY_MODEL = {"steps": 2, "batch_size": 8, "warmup": 1, "widths": [8, 16], "checkpoint_every": 100}
FAST = {"every": 1, "fraction": 0.05, "steps": 1, "ddim_steps": 2, "strength": 0.5, "batch_size": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


def _ctx(tmp_path: Path, cell: str = "c1") -> SimpleNamespace:
    """The context a cell on the biased spurious set hands the augmenter at epoch 0."""
    ds = load_dataset({"name": "spurious", "params": BIASED})
    train = Batches(ds.split("train"), 32, meta=ds.meta("train"))
    cell_dir = tmp_path / "run" / "cells" / cell
    cell_dir.mkdir(parents=True)
    return SimpleNamespace(
        student=_net(1),
        teacher=_net(0),
        train=train,
        device=torch.device("cpu"),
        cell_dir=cell_dir,
        generator=torch.Generator().manual_seed(0),
        epoch=0,
        epochs=2,
    )


def _record(aug: ConfigAugmenter, ctx: SimpleNamespace) -> dict:
    aug.on_epoch_start(0, ctx)  # checks the models and the generator's data
    aug._space = aug._pixel_space(ctx)
    aug._diffusion_model(ctx, 10)
    return aug._diffusion_record


def test_the_diffusion_model_trains_on_the_given_dataset(tmp_path):
    ctx = _ctx(tmp_path)
    own = _record(ConfigAugmenter(**FAST, model=TINY_MODEL), ctx)
    given = _record(ConfigAugmenter(**FAST, model={**TINY_MODEL, "dataset": BALANCED}), ctx)
    balanced = load_dataset({"name": "spurious", "params": {**BIASED, "variant": "balanced"}})
    groups = balanced.meta("train")["group"]
    # the images it saw: every group of the balanced variant, in its shares (the student's split
    # shows a digit on its aligned colour 90 % of the time)
    assert given["seen"]["group_counts"] == torch.bincount(groups).tolist()
    assert min(given["seen"]["group_counts"]) > 0
    assert given["seen"]["n"] == len(groups) == own["seen"]["n"]
    counts = torch.tensor(given["seen"]["group_counts"]).view(10, 2)
    assert (counts.min(1).values * 3 >= counts.max(1).values).all()  # about even within each digit
    own_counts = torch.tensor(own["seen"]["group_counts"]).view(10, 2)
    assert own_counts.sum() == counts.sum() and own_counts.min() * 4 < own_counts.max()
    # keyed by the data's spec and fingerprint: the model of the balanced images is another model
    assert given["source"]["fingerprint"] == json.loads(json.dumps(balanced.fingerprint(), default=str))
    assert given["source"]["dataset"]["name"] == "spurious"
    assert given["source"]["dataset"]["params"]["variant"] == "balanced"
    assert "source" not in own and given["key"] != own["key"]
    saved = json.loads((tmp_path / "run" / "diffusion" / given["key"] / "result.json").read_text())
    assert saved["seen"]["group_counts"] == given["seen"]["group_counts"]
    # the key is that of these images (in the model's [-1, 1] pixels) plus the data's identity
    split = balanced.split("train")
    x = torch.stack([split[i][0] for i in range(len(split))])
    y = torch.tensor([int(split[i][1]) for i in range(len(split))])
    space = ConfigAugmenter(**FAST)._pixel_space(SimpleNamespace(train=Batches(split, 32)))
    digest = data_digest(space.to_model(x).clamp(-1, 1), y)
    recipe = Recipe.from_params(TINY_MODEL)
    assert given["key"] == model_key(recipe, digest, 10, given["source"])
    # a second cell of the run reuses it
    again = _record(ConfigAugmenter(**FAST, model={**TINY_MODEL, "dataset": BALANCED}), _ctx(tmp_path, "c2"))
    assert again["key"] == given["key"] and not again["trained_here"] and given["trained_here"]


def test_existing_diffusion_keys_are_unchanged_without_the_key():
    recipe, digest = Recipe.from_params(TINY_MODEL), "d" * 64
    spec = {"recipe": asdict(recipe), "data": digest, "classes": 10, "code": CODE_VERSION}
    before = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    assert model_key(recipe, digest, 10) == model_key(recipe, digest, 10, None) == before
    source = {"dataset": {"name": "spurious", "params": {}}, "fingerprint": {"digest": "x"}}
    other = {**source, "fingerprint": {"digest": "y"}}
    assert len({before, model_key(recipe, digest, 10, source), model_key(recipe, digest, 10, other)}) == 3


GRID = """\
name: gen
datasets:
  - spurious: {{base: {{digits: {{limit: 240}}}}, kind: background, strength: 0.9, n_attr: 2}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
methods:
  - kd: {{train: {{augment: {{config: {{every: 1, fraction: 0.05, model: {model}}}}}}}}}
seeds: [0]
train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500}}
"""
BALANCED_YAML = (
    "{dataset: {spurious: {base: {digits: {limit: 240}}, kind: background, strength: 0.9, n_attr: 2, "
    "variant: balanced}}, steps: 2}"
)


def _cell_id(tmp_path: Path, monkeypatch, model: str) -> str:
    monkeypatch.setattr(registry, "versions", lambda refs: {f"{k}:{n}": "pinned==1" for k, n in refs})
    grid = load_grid(write_grid(tmp_path / "g.yaml", GRID.format(model=model)))
    (cell,) = expand(grid, [{"sha256": "ds0"}], [{"source": "s0"}])
    return cell.id


def test_the_key_changes_the_cell_id_only_when_set(tmp_path, monkeypatch):
    without = _cell_id(tmp_path, monkeypatch, "{steps: 2}")
    # computed by the code before model.dataset existed (plugin versions pinned as in test_cells)
    assert without == "84956a7a6cb1a722"
    with_key = _cell_id(tmp_path, monkeypatch, BALANCED_YAML)
    assert with_key != without
    assert _cell_id(tmp_path, monkeypatch, BALANCED_YAML.replace("0.9", "0.8")) not in (with_key, without)


def test_a_bad_spec_is_refused_when_the_grid_loads(tmp_path):
    bad = BALANCED_YAML.replace("variant: balanced", "variant: sideways")
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path / "g.yaml", GRID.format(model=bad)))
    msg = str(e.value)
    assert "g.yaml:" in msg and "model.dataset" in msg and "variant" in msg
    with pytest.raises(ConfigError, match=r"model\.dataset.*no_such_set"):
        load_grid(write_grid(tmp_path / "g.yaml", GRID.format(model="{dataset: no_such_set}")))
    with pytest.raises(ConfigError, match=r"model\.path takes no recipe keys, got dataset"):
        ConfigAugmenter(model={"path": str(tmp_path), "dataset": "digits"})


def test_a_shape_mismatch_is_a_clear_error_naming_the_key(tmp_path):
    # plain digits are 1-channel 8x8: the spurious cells' images are 3-channel 8x8
    aug = ConfigAugmenter(**FAST, model={**TINY_MODEL, "dataset": {"digits": {"limit": 100}}})
    with pytest.raises(ConfigError) as e:
        aug.validate(10, 3, 8)
    msg = str(e.value)
    assert "config: model.dataset (digits)" in msg and "1x8x8" in msg and "3x8x8" in msg
    # and at the cell's first epoch, before any training
    with pytest.raises(ConfigError, match=r"model\.dataset \(digits\).*1x8x8"):
        aug.on_epoch_start(0, _ctx(tmp_path))
    # the planner refuses the cell with the same message
    from kdbench.runner import plan

    grid = load_grid(write_grid(tmp_path / "g.yaml", GRID.format(model="{dataset: {digits: {limit: 100}}}")))
    p = plan(grid, tmp_path / "runs")
    msgs = " ".join(str(v) for v in getattr(p, "incompatible", {}).values())
    assert "model.dataset (digits)" in msgs and "1x8x8" in msgs
