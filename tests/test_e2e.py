"""End to end on real offline data (sklearn digits): run, resume, SIGKILL, determinism, report."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdbench.config import load_grid
from kdbench.engine.cell import run_cell
from kdbench.runner import plan
from tests.conftest import kdbench_cli

pytestmark = pytest.mark.slow


def rows(run_dir: Path) -> list[tuple]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return db.execute("SELECT id, status, attempts FROM cells ORDER BY id").fetchall()
    finally:
        db.close()


def test_run_then_rerun_skips_everything(tiny_grid, tmp_path):
    grid = tiny_grid(methods="[ce, kd, {dkd: {warmup: 1}}, fitnet]", seeds="[0, 1]")
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs" / "tiny"
    got = rows(run_dir)
    assert len(got) == 8 and all(s == "done" for _, s, _ in got)
    # the leaderboard: reference rows first, every method, mean ± std over 2 seeds
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    names = [ln.split("|")[1].strip() for ln in lines[2:]]
    assert names == ["teacher", "ce", "kd", "dkd(warmup=1)", "fitnet"]
    assert all("(2)" in ln for ln in lines[3:])  # students: 2 seeds each
    assert "**" in r.stdout  # best per column marked
    # one teacher, trained once, shared by every distilling cell
    assert len(list((run_dir / "teachers").glob("*.pt"))) == 1
    cell_dir = next((run_dir / "cells").iterdir())
    for name in ("config.json", "result.json", "log.txt", "metrics.jsonl", "student.pt"):
        assert (cell_dir / name).exists(), name
    mtimes = {p: p.stat().st_mtime for p in run_dir.glob("cells/*/result.json")}
    r2 = kdbench_cli("run", str(grid))
    assert r2.returncode == 0
    assert "8 of 8 cells already done" in r2.stderr
    assert {p: p.stat().st_mtime for p in run_dir.glob("cells/*/result.json")} == mtimes
    assert rows(run_dir) == got


def test_same_cell_same_numbers(tiny_grid, tmp_path):
    p = plan(load_grid(tiny_grid(methods="[kd]")))
    cell = p.cells[0]
    a = run_cell(cell, tmp_path / "a")
    b = run_cell(cell, tmp_path / "b")
    assert a.status == b.status == "done", a.error
    for k in ("top1", "nll", "ece", "agreement"):
        assert a.metrics[k] == b.metrics[k], k


def test_sigkill_mid_sweep_then_resume_records_each_cell_once(tiny_grid, tmp_path):
    grid = tiny_grid(methods="[ce, kd, fitnet]", seeds="[0, 1]", epochs=3)
    run_dir = tmp_path / "runs" / "tiny"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdbench.cli", "run", str(grid)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # kill it once at least one cell is done and another is part-way (an epoch checkpoint exists)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = list(run_dir.glob("cells/*/result.json"))
        partial = list(run_dir.glob("cells/*/checkpoint.pt"))
        if done and partial:
            break
        if proc.poll() is not None:
            pytest.fail("the sweep finished before it could be killed")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done_before = len(list(run_dir.glob("cells/*/result.json")))
    assert 1 <= n_done_before < 6
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    got = rows(run_dir)
    assert len(got) == 6 and len({i for i, _, _ in got}) == 6
    assert all(s == "done" for _, s, _ in got)
    assert not list(run_dir.glob("cells/*/checkpoint.pt"))
    # the interrupted cell resumed from its checkpoint: its metrics file has each epoch once
    for m in run_dir.glob("cells/*/metrics.jsonl"):
        epochs = [json.loads(ln)["epoch"] for ln in m.read_text().splitlines()]
        assert epochs == sorted(set(epochs)), m


def test_resumed_cell_matches_uninterrupted(tiny_grid, tmp_path):
    """A checkpoint taken mid-training and resumed gives the numbers of an uninterrupted run."""
    p = plan(load_grid(tiny_grid(methods="[fitnet]", epochs=3)))
    cell = p.cells[0]
    full = run_cell(cell, tmp_path / "full")
    # interrupt after the first epoch by making the progress callback raise
    calls = {"n": 0}

    def stop_after_one(row):
        if row["stage"] == "train":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, tmp_path / "cut", stop_after_one)
    assert (tmp_path / "cut" / "cells" / cell.id / "checkpoint.pt").exists()
    resumed = run_cell(cell, tmp_path / "cut")
    assert resumed.status == "done", resumed.error
    for k in ("top1", "nll", "agreement"):
        assert resumed.metrics[k] == pytest.approx(full.metrics[k], abs=1e-9), k


def test_report_formats_from_store(tiny_grid, tmp_path):
    grid = tiny_grid(methods="[ce, kd]", seeds="[0, 1]")
    assert kdbench_cli("run", str(grid)).returncode == 0
    run_dir = tmp_path / "runs" / "tiny"
    latex = kdbench_cli("report", str(run_dir), "--format", "latex").stdout
    assert "\\toprule" in latex and "\\bottomrule" in latex and "\\textbf{" in latex
    assert "$\\pm$" in latex
    data = json.loads(kdbench_cli("report", str(run_dir), "--format", "json").stdout)
    kd = next(r for r in data if r["method"] == "kd")
    assert kd["metrics"]["top1"]["n"] == 2
    for m in ("top1", "top5", "agreement", "ece", "wall_s"):
        assert m in kd["metrics"], m
    csv_text = kdbench_cli("report", str(run_dir), "--format", "csv").stdout
    assert csv_text.splitlines()[0].startswith("method,column,metric,mean,std,n,best,status,")
    bad = kdbench_cli("report", str(run_dir), "--format", "xml")
    assert bad.returncode == 2


def test_teacher_from_checkpoint_with_pinned_hash(tmp_path):
    import torch

    from kdbench.artifacts import sha256_file as file_sha256
    from kdbench.models.smallcnn import smallcnn
    from tests.conftest import write_grid

    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": smallcnn(10, 1, 8).state_dict()}, ckpt)
    sha = file_sha256(ckpt)

    def grid(pin: str) -> Path:
        return write_grid(
            tmp_path / "g.yaml",
            f"""
name: ckpt
output: {tmp_path / "runs"}
datasets: [{{digits: {{limit: 200}}}}]
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
    source: {{checkpoint: {{path: {ckpt}, sha256: {pin}}}}}
methods: [kd]
train: {{epochs: 1, views: {{}}}}
""",
        )

    bad = kdbench_cli("run", str(grid("0" * 64)))
    assert bad.returncode == 2 and "sha256" in bad.stderr and not (tmp_path / "runs").exists()
    ok = kdbench_cli("run", str(grid(sha)))
    assert ok.returncode == 0, ok.stderr
    teacher_result = next((tmp_path / "runs" / "ckpt" / "teachers").glob("*/result.json"))
    rec = json.loads(teacher_result.read_text())
    assert rec["teacher"]["source"]["fingerprint"]["sha256"] == sha
    assert "teacher" in ok.stdout
    # the untrained checkpoint is evaluated, not trained: nothing in its metrics file
    assert not (teacher_result.parent / "metrics.jsonl").exists()


def test_parallel_local_workers_match_inline(tiny_grid, tmp_path):
    grid = tiny_grid(methods="[ce, kd, at]", seeds="[0]")
    r = kdbench_cli("run", str(grid), "--workers", "2", "--out", str(tmp_path / "par"))
    assert r.returncode == 0, r.stderr
    assert len(rows(tmp_path / "par")) == 3
    inline = kdbench_cli("run", str(grid), "--out", str(tmp_path / "seq"))
    assert inline.returncode == 0
    par = json.loads(kdbench_cli("report", str(tmp_path / "par"), "--format", "json").stdout)
    seq = json.loads(kdbench_cli("report", str(tmp_path / "seq"), "--format", "json").stdout)
    top1 = lambda recs: {r["method"]: r["metrics"]["top1"]["mean"] for r in recs}  # noqa: E731
    assert top1(par) == top1(seq)  # same cells, same numbers, whichever process ran them


def test_vit_to_mobilenetv2_from_a_local_hugging_face_checkpoint(tmp_path):
    """The ViT → MobileNetV2 distillation of the Transformers KD guide, offline."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from tests.conftest import write_grid

    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=10,
    )  # fmt: skip
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    grid = write_grid(
        tmp_path / "g.yaml",
        f"""
name: vit
output: {tmp_path / "runs"}
datasets: [{{digits: {{limit: 128}}}}]
pairs:
  - teacher: {{hf: {{path: {tmp_path / "vit"}, input_size: 32}}}}
    student: torchvision:mobilenet_v2
    source: loaded
methods: [kd]
train: {{epochs: 1, batch_size: 64, views: {{}}}}
""",
    )
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    assert "torchvision:mobilenet_v2" in r.stdout and "| kd" in r.stdout
    # a loaded teacher is evaluated, never trained
    assert not list((tmp_path / "runs" / "vit" / "teachers").glob("*/metrics.jsonl"))
