"""SIGTERM (what Slurm or a container sends before a kill): checkpoint at the next step, exit 143,
resume to the numbers of an uninterrupted run; pool workers checkpoint too and do not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import done_metrics, kdbench_cli

pytestmark = pytest.mark.slow


def _workers(pid: int) -> list[int]:
    """The driver's worker processes (spawned ``spawn_main``; not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = []
    for k in (int(x) for x in out.split()):
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            kids.append(k)
    return kids


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_checkpoints_exits_143_and_resumes_to_the_same_numbers(tiny_grid, tmp_path, workers):
    grid = tiny_grid(methods="[ce, kd]", seeds="[0]", epochs=6)
    ref = tiny_grid(methods="[ce, kd]", seeds="[0]", epochs=6, name="ref.yaml")
    ref.write_text(ref.read_text().replace("name: tiny", "name: ref"))
    assert kdbench_cli("run", str(ref)).returncode == 0
    want = done_metrics(tmp_path / "runs" / "ref")

    run_dir = tmp_path / "runs" / "tiny"
    args = [sys.executable, "-m", "kdbench.cli", "run", str(grid), "--workers", str(workers)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(run_dir.glob("cells/*/checkpoint.pt")):
        time.sleep(0.02)
    assert list(run_dir.glob("cells/*/checkpoint.pt")), "no cell reached a checkpoint"
    kids = _workers(proc.pid)
    assert workers == 1 or kids, "no worker processes found"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "SIGTERM" in stderr
    time.sleep(1.0)
    assert not [k for k in kids if os.path.exists(f"/proc/{k}")], "workers outlived their driver"
    assert not list(run_dir.glob("cells/*/result.json")) or len(done_metrics(run_dir)) < 2

    r = kdbench_cli("run", str(grid), "--workers", str(workers))
    assert r.returncode == 0, r.stderr
    assert done_metrics(run_dir) == {k: v for k, v in want.items()} or sorted(
        done_metrics(run_dir).values(), key=str
    ) == sorted(want.values(), key=str)
