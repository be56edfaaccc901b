"""Engine end to end on a tiny offline grid: validation hold-out, per-epoch evaluation, one final
evaluation, datasets loaded once per process, the environment recorded with every result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kdbench.cells import PluginKey
from kdbench.config import load_grid
from kdbench.engine import cell as engine
from kdbench.runner import plan
from tests.conftest import write_grid

pytestmark = pytest.mark.slow

GRID = """
name: eng
output: {out}
datasets: [{{digits: {{limit: 400}}}}]
pairs: [{{teacher: {{smallcnn: {{width: 8}}}}, student: {{smallcnn: {{width: 4}}}}}}]
methods: [kd]
train: {{epochs: 2, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
eval: {eval}
"""


def _cell(tmp_path: Path, eval_: str):
    g = write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs", eval=eval_))
    return plan(load_grid(g)).cells[0]


def _rows(run_dir: Path, cell) -> list[dict]:
    text = (run_dir / "cells" / cell.id / "metrics.jsonl").read_text()
    return [json.loads(ln) for ln in text.splitlines()]


def test_val_split_and_per_epoch_evaluation(tmp_path):
    cell = _cell(tmp_path, "{batch_size: 500, val_fraction: 0.25, every: 1}")
    assert cell.teacher.val_fraction == 0.25  # the teacher holds out the same split
    run = tmp_path / "runs"
    res = engine.run_cell(cell, run)
    assert res.status == "done", res.error
    m = res.metrics
    assert {"top1", "nll", "ece", "agreement", "val/top1", "val/nll"} <= set(m)
    rows = [r for r in _rows(run, cell) if r["stage"] == "train"]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert {"test/top1", "test/nll", "val/top1", "val/nll"} <= set(r) and "test/ece" not in r
    assert rows[-1]["test/top1"] == m["top1"]  # the last epoch's model is the final model
    cached = sorted(p.name for p in (run / "teachers" / cell.teacher.id / "eval").glob("*.pt"))
    assert len(cached) == 2 and any("-test" in n for n in cached)  # teacher logits on test and val, kept
    teacher = json.loads(next((run / "teachers").glob("*/result.json")).read_text())
    assert "val/top1" in teacher["metrics"] and "top1" in teacher["metrics"]
    env = res.env
    assert {"cpu_capability", "blas", "threads", "torch", "kernels"} <= set(env)

    # the split: stratified, disjoint from train, stable, and what the cell trained on
    data = engine.cell_data(cell.dataset, 64, 500, 0.25)
    keep, held = data.train.indices, data.val.indices
    assert abs(len(held) - 100) <= 5 and len(keep) + len(held) == 400  # per-class rounding
    assert not set(keep.tolist()) & set(held.tolist())
    y = data.train.data.tensors[1]
    share = torch.bincount(y[held], minlength=10).float() / torch.bincount(y, minlength=10).float()
    assert (share - 0.25).abs().max() < 0.1
    assert torch.equal(engine.cell_data(cell.dataset, 64, 500, 0.25).val.indices, held)


def test_default_evaluates_the_final_model_only(tmp_path):
    cell = _cell(tmp_path, "{batch_size: 500}")
    res = engine.run_cell(cell, tmp_path / "runs")
    assert res.status == "done", res.error
    assert not any(k.startswith("val/") for k in res.metrics)
    assert all(not any("/" in k for k in r) for r in _rows(tmp_path / "runs", cell))
    # datasets are loaded once per process
    assert engine.load_dataset(cell.dataset) is engine.load_dataset(cell.dataset)


def test_method_views_stack_on_the_grid_and_a_missing_one_is_an_error(tmp_path):
    from kdbench.engine import views
    from kdbench.errors import ConfigError
    from kdbench.methods.base import Distiller

    class Consistent(Distiller):
        student_view = "strong"
        teacher_view = "clean"

    cell = _cell(tmp_path, "{batch_size: 500}")  # train.views is {}
    assert views.student_view(cell, Distiller) is None  # no opinion: the grid's augment alone
    with pytest.raises(ConfigError, match="the view 'strong', which train.views lacks"):
        views.student_view(cell, Consistent)  # no silent fallback to the grid's augment
    strong = cell.model_copy(update={"views": {"strong": PluginKey(name="randaugment", params={"n": 2})}})
    assert views.student_view(strong, Consistent).params == {"n": 2}  # the named view
    assert views.teacher_view(cell, Consistent) == "clean"
    assert views.teacher_view(cell, Distiller) == "student"
    flip = strong.model_copy(update={"augment": strong.augment.model_copy(update={"name": "flip_crop"})})
    assert views.describe(flip, Consistent) == {"student": "flip_crop + randaugment", "teacher": "flip_crop"}
    Consistent.student_view = "flip_crop"  # an augmenter name works too
    assert views.student_view(cell, Consistent) == {"name": "flip_crop", "params": {}}


def test_run_cell_leaves_no_open_descriptor(tmp_path):
    """A long inline sweep must not run out of descriptors: each cell closes its log file."""
    import os

    cell = _cell(tmp_path, "{batch_size: 500}")
    broken = cell.model_copy(update={"train": cell.train.model_copy(update={"device": "meta"})})
    engine.run_cell(broken, tmp_path / "runs")  # warm-up: imports, dataset cache
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        res = engine.run_cell(broken, tmp_path / "runs")
        assert res.status == "failed"
    assert len(os.listdir("/proc/self/fd")) <= before
    assert not logging.getLogger(f"kdbench.cell.{cell.id}").handlers


def test_the_driver_and_its_inline_cells_share_one_dataset_instance(tmp_path):
    g = write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs", eval="{batch_size: 500}"))
    engine._DATASETS.clear()
    p = plan(load_grid(g))
    assert len(engine._DATASETS) == 1
    assert engine.load_dataset(p.cells[0].dataset) is next(iter(engine._DATASETS.values()))
    assert len(engine._DATASETS) == 1
