"""The GPU check's CPU dry run (``benchmarks/gpu_check.py --device cpu --steps 2``): every step runs
in its own process and the summary has a pass or skip row for each, none failed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_cpu_dry_run_passes_every_step(tmp_path: Path):
    """The CPU mode CI runs, with the DDP cell on 2 gloo ranks so that its step runs too."""
    report = tmp_path / "check.json"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--steps", "2", "--ddp-cpu"]
    cmd += ["--out", str(tmp_path / "out"), "--json", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = json.loads(report.read_text())["rows"]
    assert [(r["step"], r["setting"]) for r in rows] == [
        ("kernel tests + opcheck", "cpu"),
        ("kdbench bench --quick", "cpu"),
        ("device kernels", "cpu"),
        ("grid_throughput", "fp32"),
        ("grid_throughput", "bf16"),
        ("grid_throughput", "bf16+channels_last"),
        ("DDP cell", "2 ranks, gloo"),
    ]
    assert all(r["status"] == "pass" for r in rows), rows
    by = {(r["step"], r["setting"]): r["numbers"] for r in rows}
    assert by[("kernel tests + opcheck", "cpu")]["passed"] >= 1
    assert {"KD fwd+bwd vs eager", "CKA fwd vs six-line"} <= by[("kdbench bench --quick", "cpu")].keys()
    assert all(v > 0 for v in by[("grid_throughput", "bf16")].values())
    assert by[("DDP cell", "2 ranks, gloo")]["backend"] == "gloo"
    table = p.stdout.split("| step")[1]
    assert table.count("| PASS") == len(rows) and "FAIL" not in table


def test_ddp_cell_is_skipped_with_the_reason():
    assert "--device cuda" in gpu_check.ddp_skip_reason("cpu", 0, ddp_cpu=False)
    assert "1 GPU visible" in gpu_check.ddp_skip_reason("cuda", 1, ddp_cpu=False)
    assert gpu_check.ddp_skip_reason("cuda", 2, ddp_cpu=False) is None
    assert gpu_check.ddp_skip_reason("cpu", 0, ddp_cpu=True) is None


def test_bench_ratios_read_rows_or_a_report_with_rows():
    rows = [
        {
            "case": "KD fwd+bwd B=8 C=10",
            "impl": "native",
            "speedup_vs_baseline": 3.0,
            "speedup_vs_compiled": 2.0,
        },
        {
            "case": "KD fwd+bwd B=8 C=10",
            "impl": "eager",
            "speedup_vs_baseline": 1.0,
            "speedup_vs_compiled": 0.5,
        },
        {
            "case": "CKA fwd n=8 L=2+2 d=4",
            "impl": "native",
            "speedup_vs_baseline": 1.5,
            "speedup_vs_torch": 1.5,
        },
    ]
    want = {"KD fwd+bwd vs eager": 3.0, "KD fwd+bwd vs compiled": 2.0, "CKA fwd vs six-line": 1.5}
    assert gpu_check.bench_ratios(rows) == want
    assert gpu_check.bench_ratios({"env": {}, "rows": rows}) == want


def test_a_step_that_fails_or_hangs_is_a_failed_row(tmp_path: Path):
    proc = gpu_check.run_step(
        "hang", [sys.executable, "-c", "print('x'); import time; time.sleep(30)"], tmp_path, 2
    )
    row = gpu_check.failed("hang", "cpu", proc)
    assert proc.rc is None and row.status == "fail" and "timed out" in row.result
    assert "x\n\n[timed out after 2 s]" in (tmp_path / "hang.log").read_text()
