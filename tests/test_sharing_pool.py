"""Lockstep groups as pool jobs: with ``share_teacher`` and ``--workers N`` each group (one
teacher, data, seed) is one worker's job, so groups run side by side with the numbers of the
cells run alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import kdbench_cli

pytestmark = pytest.mark.slow


def _metrics(run_dir: Path) -> dict[str, dict]:
    out = {}
    for f in run_dir.glob("cells/*/result.json"):
        r = json.loads(f.read_text())
        assert r["status"] == "done", r.get("error")
        out[f.parent.name] = {k: v for k, v in r["metrics"].items() if not k.endswith("_s")}
    return out


def test_groups_run_on_pool_workers_with_the_numbers_of_cells_alone(tiny_grid, tmp_path):
    grid = tiny_grid(methods="[ce, kd, fitnet]", seeds="[0, 1]", epochs=2)
    alone = kdbench_cli("run", str(grid), "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    grid.write_text(grid.read_text() + "executor: {share_teacher: true, workers: 2}\n")
    shared = kdbench_cli("run", str(grid), "--out", str(tmp_path / "shared"))
    assert shared.returncode == 0, shared.stderr
    assert "done 6" in shared.stderr, shared.stderr
    got, want = _metrics(tmp_path / "shared"), _metrics(tmp_path / "alone")
    assert len(want) == 6 and got == want
    # kd and fitnet of one seed ran in one worker process, the two seeds in two
    pids: dict[int, set[str]] = {}
    for d in (tmp_path / "shared" / "cells").iterdir():
        env = json.loads((d / "result.json").read_text())["env"]
        cfg = json.loads((d / "config.json").read_text())
        if cfg["method"]["name"] != "ce":
            pids.setdefault(env["pid"], set()).add(f"{cfg['method']['name']}/{cfg['seed']}")
    assert sorted(map(sorted, pids.values())) == [["fitnet/0", "kd/0"], ["fitnet/1", "kd/1"]], pids
