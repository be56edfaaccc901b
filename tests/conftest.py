"""Shared fixtures: tiny grids on real offline data, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_grid(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def kdbench_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the installed CLI in a fresh interpreter (as a user would)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kdbench.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TINY_GRID = """
name: tiny
output: {out}
datasets:
  - {{digits: {{limit: 400}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: {methods}
seeds: {seeds}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 2, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500}}
"""


@pytest.fixture
def tiny_grid(tmp_path: Path):
    def make(methods: str = "[ce, kd]", seeds: str = "[0]", epochs: int = 1, name: str = "grid.yaml") -> Path:
        return write_grid(
            tmp_path / name,
            TINY_GRID.format(out=tmp_path / "runs", methods=methods, seeds=seeds, epochs=epochs),
        )

    return make
