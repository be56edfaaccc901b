"""Corruption evaluation through the CLI: metrics per set, cached sets, report kinds."""

from __future__ import annotations

import json

import pytest

from kdbench.cells import EvalSpec
from tests.conftest import kdbench_cli, write_grid

GRID = """
name: ctiny
output: {out}
datasets:
  - {{digits: {{limit: 300}}}}
pairs:
  - teacher: {{smallcnn: {{width: 4}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: [ce, kd]
seeds: [0]
train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500, corruptions: [fog, glass_blur], severities: [1, 5], corruption_seed: 2}}
"""


def test_eval_defaults_keep_cell_ids():
    # the new eval fields are left out of the hashed dump while unset
    assert EvalSpec().model_dump(mode="json") == {"batch_size": 512, "ece_bins": 15}
    assert "corruptions" in EvalSpec(corruptions="all").model_dump(mode="json")


@pytest.mark.slow
def test_corruption_eval_end_to_end(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs"))
    env = {"OMP_NUM_THREADS": "1"}
    r = kdbench_cli("run", str(grid), env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    run_dir = tmp_path / "runs" / "ctiny"
    results = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*/result.json")]
    assert len(results) == 2
    sets = {f"c/{c}/{s}" for c in ("fog", "glass_blur") for s in (1, 5)}
    for res in results:
        m = res["metrics"]
        assert {f"{s}/top1" for s in sets} <= set(m) and {f"{s}/nll" for s in sets} <= set(m)
        mean = sum(m[f"{s}/top1"] for s in sets) / 4
        assert m["corruption_acc"] == pytest.approx(mean)
        assert m["corruption_rel_drop"] == pytest.approx(100 * (m["top1"] - mean) / m["top1"])
        # cells with a teacher record its accuracy on each corrupted set
        uses_teacher = res["cell"]["uses_teacher"]
        assert ("c/fog/5/teacher_top1" in m) == uses_teacher and "teacher_top1" not in m
    # each set generated once for the run, checksummed
    cached = sorted(p.name for p in (run_dir / "cache" / "corruptions").glob("*.pt"))
    assert len(cached) == 4 and all(
        (run_dir / "cache" / "corruptions" / f"{n}.sha256").exists() for n in cached
    )
    lb = kdbench_cli("report", str(run_dir), "--metric", "corruption_acc", env=env)
    assert lb.returncode == 0, lb.stderr
    assert "corruption acc" in lb.stdout
    png = tmp_path / "sev.png"
    k = kdbench_cli("report", str(run_dir), "--kind", "corruptions", "--plot", str(png), env=env)
    assert k.returncode == 0, k.stderr
    assert "| glass " in k.stdout and "mCE (ce=100)" in k.stdout and png.exists()
    assert "| teacher " in k.stdout
