"""The `config` augmenter inside a real cell: rounds, replacement, artefacts, resume."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from kdbench.artifacts import load_checked  # noqa: E402
from kdbench.augment.config_aug import generation_cost  # noqa: E402
from kdbench.config import load_grid  # noqa: E402
from kdbench.engine.cell import run_cell  # noqa: E402
from kdbench.runner import plan  # noqa: E402
from tests.conftest import write_grid  # noqa: E402

pytestmark = pytest.mark.slow

GRID = """
name: cfg
output: {out}
datasets:
  - {{digits: {{limit: 200}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: [kd]
seeds: [0]
train:
  epochs: 3
  batch_size: 64
  lr: 0.05
  schedule: cosine
  views: {{}}
  augment:
    config: {{every: 1, fraction: 0.1, steps: 3, ddim_steps: 4, batch_size: 16,
              model: {{steps: 5, widths: [8, 16], batch_size: 16}}}}
teacher_train: {{epochs: 2, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500}}
"""


def test_kd_with_config_runs_rounds_and_replaces_them(tmp_path):
    torch.set_num_threads(1)
    grid = write_grid(tmp_path / "grid.yaml", GRID.format(out=tmp_path / "runs"))
    cell = plan(load_grid(grid)).cells[0]
    run_dir = tmp_path / "runs" / "cfg"
    result = run_cell(cell, run_dir)
    assert result.status == "done", result.error
    cdir = run_dir / "cells" / cell.id
    # rounds at the start of epochs 1 and 2, each 10 % of the 200 training samples
    for r in (1, 2):
        assert (cdir / "config" / f"round_{r:03d}.png").exists()
    extra = [load_checked(cdir / "extra" / f"epoch{e:04d}-0.pt") for e in (1, 2)]
    assert [len(e["y"]) for e in extra] == [20, 20]
    assert [e["replace"] for e in extra] == [False, True]  # round 2 replaces round 1
    rows = [json.loads(ln) for ln in (cdir / "metrics.jsonl").read_text().splitlines()]
    cfg_rows = [r for r in rows if r["stage"] == "config"]
    assert [(r["epoch"], r["round"], r["config/n"]) for r in cfg_rows] == [(1, 1, 20), (2, 2, 20)]
    # each sample keeps its best iterate: its objective never ends below its reconstruction's
    c = load_checked(cdir / "config" / "round_002.pt")["conf"]
    after = c["t_after"] ** 2 + (1 - c["f_after"]) ** 2
    start = c["t_start"] ** 2 + (1 - c["f_start"]) ** 2
    assert bool((after >= start).all())
    assert len(list((run_dir / "diffusion").glob("*/model.pt"))) == 1
    cost = generation_cost(cdir)
    assert cost["rounds"] == 2 and cost["images"] == 40 and cost["images_per_s"] > 0
    assert 0 < cost["gen_share"] < 1 and 0 < cost["diffusion_share"] < 1


def test_a_cell_interrupted_after_a_round_resumes_to_the_same_images_and_numbers(tmp_path):
    torch.set_num_threads(1)
    grid = write_grid(tmp_path / "grid.yaml", GRID.format(out=tmp_path / "runs"))
    cell = plan(load_grid(grid)).cells[0]

    def stop_after_two_epochs(row: dict) -> None:
        if row.get("stage") == "train" and row.get("epoch") == 2:
            raise KeyboardInterrupt  # the checkpoint after epoch 2 is written before this hook

    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, tmp_path / "a", progress=stop_after_two_epochs)
    cdir = tmp_path / "a" / "cells" / cell.id
    assert (cdir / "config" / "round_001.pt").exists() and not (cdir / "config" / "round_002.pt").exists()
    resumed = run_cell(cell, tmp_path / "a")
    straight = run_cell(cell, tmp_path / "b")
    assert resumed.status == straight.status == "done"
    for r in (1, 2):
        a = load_checked(cdir / "config" / f"round_{r:03d}.pt")
        b = load_checked(tmp_path / "b" / "cells" / cell.id / "config" / f"round_{r:03d}.pt")
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["source"], b["source"])
    assert resumed.metrics["top1"] == straight.metrics["top1"]
    rows = [json.loads(ln) for ln in (cdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["stage"] == "config"] == [1, 2]
