"""Mixed precision, channels_last and compile (train recipe), shown on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdbench.cells import TrainRecipe
from kdbench.config import load_grid
from kdbench.engine import precision
from kdbench.engine.cell import run_cell
from kdbench.runner import plan
from tests.conftest import write_grid

GRID = """
name: p
output: {out}
datasets:
  - {{digits: {{limit: 600}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: [{method}]
seeds: [0]
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}{extra}}}
teacher_train: {{epochs: 3, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500}}
"""


def _cell(tmp_path: Path, extra: str = "", method: str = "kd", epochs: int = 3):
    body = GRID.format(out=tmp_path / "runs", method=method, epochs=epochs, extra=extra and ", " + extra)
    g = write_grid(tmp_path / f"grid{abs(hash(extra))}.yaml", body)
    return plan(load_grid(g)).cells[0]


def _losses(run_dir: Path, cell) -> list[float]:
    rows = (run_dir / "cells" / cell.id / "metrics.jsonl").read_text().splitlines()
    return [sum(v for k, v in json.loads(r).items() if k.startswith("loss_")) for r in rows]


def test_new_recipe_fields_stay_out_of_ids_at_their_defaults():
    plain = TrainRecipe().model_dump(mode="json")
    assert not {"precision", "channels_last", "compile"} & set(plain)
    assert TrainRecipe(precision="bf16").model_dump(mode="json")["precision"] == "bf16"
    with pytest.raises(ValueError):
        TrainRecipe(precision="fp8")


def test_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights():
    amp = precision.Amp(TrainRecipe(precision="bf16"), torch.device("cpu"))
    conv = nn.Conv2d(3, 4, 3)
    with amp.autocast():
        out = conv(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.bfloat16 and conv.weight.dtype == torch.float32
    fp32 = precision.Amp(TrainRecipe(), torch.device("cpu"))
    with fp32.autocast():
        assert conv(torch.randn(2, 3, 8, 8)).dtype == torch.float32
    assert fp32.scaler is None and precision.Amp(TrainRecipe(precision="fp16"), "cpu").scaler is not None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_bf16_cell_trains_and_matches_fp32(tmp_path, method):
    """Tolerance: per-epoch training loss within 5 % (relative) of fp32, final top-1 within 5
    points and NLL within 10 % (measured: losses 0.1-2 %, top-1 1.7-2.5 points on 359 test
    images, NLL 0.5-4 %)."""
    runs = tmp_path / "runs"
    c32, c16 = _cell(tmp_path, method=method), _cell(tmp_path, "precision: bf16", method=method)
    assert c32.id != c16.id
    r32, r16 = run_cell(c32, runs), run_cell(c16, runs)
    assert r32.status == r16.status == "done", r16.error
    l32, l16 = _losses(runs, c32), _losses(runs, c16)
    assert l32 != l16  # autocast changed the arithmetic
    for a, b in zip(l32, l16, strict=True):
        assert b == pytest.approx(a, rel=0.05)
    assert abs(r16.metrics["top1"] - r32.metrics["top1"]) <= 5.0
    assert r16.metrics["nll"] == pytest.approx(r32.metrics["nll"], rel=0.10)


@pytest.mark.slow
def test_fp16_grad_scaler_state_survives_resume(tmp_path):
    cell = _cell(tmp_path, "precision: fp16", epochs=3)
    full = run_cell(cell, tmp_path / "full")
    assert full.status == "done", full.error

    def stop_after_one(row):
        if row["stage"] == "train" and row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, tmp_path / "cut", stop_after_one)
    ckpt = torch.load(tmp_path / "cut" / "cells" / cell.id / "checkpoint.pt", weights_only=False)
    assert ckpt["trainer"]["amp"]["scaler"]["scale"] > 0
    resumed = run_cell(cell, tmp_path / "cut")
    for k in ("top1", "nll", "agreement"):
        assert resumed.metrics[k] == full.metrics[k], k


@pytest.mark.slow
def test_channels_last_and_compile_keep_the_numbers_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "COMPILE_BACKEND", "eager")  # dynamo tracing, no C compiler
    runs = tmp_path / "runs"
    base = run_cell(_cell(tmp_path, method="fitnet", epochs=1), runs)
    for extra in ("channels_last: true", "compile: true"):
        other = run_cell(_cell(tmp_path, extra, method="fitnet", epochs=1), runs)
        assert other.status == "done", other.error
        for k in ("top1", "nll", "agreement"):  # fitnet reads stage taps: hooks still fire
            assert other.metrics[k] == pytest.approx(base.metrics[k], rel=1e-4, abs=1e-4), (extra, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_in_memory_split_kept_on_the_gpu_gives_the_same_batches():
    from kdbench.datasets._util import NormalizedImages
    from kdbench.engine.data import Batches

    imgs = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50) % 10

    def batches() -> list:
        b = Batches(NormalizedImages(imgs.clone(), labels, [0.5] * 3, [0.25] * 3), 16)
        return b, list(b.iterate(torch.Generator().manual_seed(3)))

    _, want = batches()
    dev, _ = batches()
    precision.keep_on_device(dev, torch.device("cuda"))
    got = list(dev.iterate(torch.Generator().manual_seed(3)))
    for (x0, y0, i0), (x1, y1, i1) in zip(want, got, strict=True):
        assert x1.is_cuda and torch.equal(x0, x1.cpu()) and torch.equal(y0, y1) and torch.equal(i0, i1)
