"""Lockstep groups as pool jobs: with ``share_teacher`` and ``--workers N`` each group (one
teacher, data, seed) is one worker's job, with the numbers of the cells run alone."""

from __future__ import annotations

import json

import pytest

from tests.conftest import done_metrics, kdbench_cli

pytestmark = pytest.mark.slow


def test_groups_run_on_pool_workers_with_the_numbers_of_cells_alone(tiny_grid, tmp_path):
    grid = tiny_grid(methods="[ce, kd, fitnet]", seeds="[0, 1]", epochs=2)
    alone = kdbench_cli("run", str(grid), "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    grid.write_text(grid.read_text() + "executor: {share_teacher: true, workers: 2}\n")
    shared = kdbench_cli("run", str(grid), "--out", str(tmp_path / "shared"))
    assert shared.returncode == 0, shared.stderr
    assert "done 6" in shared.stderr, shared.stderr
    got, want = done_metrics(tmp_path / "shared"), done_metrics(tmp_path / "alone")
    assert len(want) == 6 and got == want
    # kd and fitnet of one seed ran in one worker process (which worker took which group, and
    # whether one worker took both, depends on scheduling); both workers ran cells
    pid: dict[str, int] = {}
    for d in (tmp_path / "shared" / "cells").iterdir():
        env = json.loads((d / "result.json").read_text())["env"]
        cfg = json.loads((d / "config.json").read_text())
        pid[f"{cfg['method']['name']}/{cfg['seed']}"] = env["pid"]
    assert pid["kd/0"] == pid["fitnet/0"] and pid["kd/1"] == pid["fitnet/1"], pid
    assert len(set(pid.values())) == 2, pid
