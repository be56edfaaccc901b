"""Per-cell time limits and retries (issue 11, item 8): the parts that need no process."""

from __future__ import annotations

import json

import pytest

from kdbench.config import ConfigError, load_grid, parse_duration
from kdbench.engine.cell import run_cell
from kdbench.executors.base import this_attempt
from kdbench.pool import retry_if_allowed
from tests.conftest import TINY_GRID


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90), ("90s", 90), ("2min", 120), ("30m", 1800), ("1h30m", 5400), ("1.5h", 5400), ("1:30:00", 5400)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_a_bad_time_limit_names_the_key_and_the_forms(tmp_path):
    grid = tmp_path / "g.yaml"
    text = TINY_GRID.format(out=tmp_path, methods="[ce]", seeds="[0]", epochs=1)
    grid.write_text(text + "executor: {time_limit: soon}\n")
    with pytest.raises(ConfigError, match=r"executor.time_limit.*90s, 30m, 2h"):
        load_grid(grid)
    grid.write_text(text + "executor: {time_limit: 2h, retries: -1}\n")
    with pytest.raises(ConfigError, match="retries must be 0 or more"):
        from kdbench.executors.driver import build_executor
        from kdbench.runner import plan

        build_executor(plan(load_grid(grid)).executor)


def test_only_infrastructure_failures_are_retried():
    cell = {"id": "c1"}
    attempts, first = {"c1": 1}, {"c1": 1}
    nan = {"cell": cell, "status": "failed", "error": "non-finite loss at epoch 1", "attempt": 1}
    assert not retry_if_allowed(nan, attempts, first, retries=3)  # it would fail again
    died = {"cell": cell, "status": "failed", "error": "killed by signal SIGKILL", "retryable": True}
    assert retry_if_allowed(dict(died), attempts, first, retries=2) and attempts["c1"] == 2
    assert retry_if_allowed(dict(died), attempts, first, retries=2) and attempts["c1"] == 3
    last = dict(died)
    assert not retry_if_allowed(last, attempts, first, retries=2)  # two retries used
    assert "retry_attempt" not in last and attempts["c1"] == 3


def test_a_restarted_submission_counts_its_attempts(tmp_path):
    assert this_attempt(tmp_path, 1) == 1  # first start
    (tmp_path / "worker.json").write_text(json.dumps({"attempt": 1}))
    assert this_attempt(tmp_path, 1) == 2  # Ray retried it / Slurm requeued it
    (tmp_path / "worker.json").write_text(json.dumps({"attempt": 2}))
    assert this_attempt(tmp_path, 3) == 3  # a later `kdbench run` counted past it already


def test_time_limit_stops_a_cell_at_a_step_and_says_where(tmp_path, tiny_grid):
    from kdbench.runner import plan

    p = plan(load_grid(tiny_grid("[ce]", epochs=2)))
    cell = p.cells[0]
    r = run_cell(cell, tmp_path, None, 1, time_limit=1e-9)  # over before the first step
    assert r["status"] == "failed" and r["retryable"], r
    assert r["error"].startswith("TimeLimitReached: time limit of 1e-09 s reached at train epoch 1 step 0")
    assert (tmp_path / "cells" / cell.id / "checkpoint.pt").exists()
    done = run_cell(cell, tmp_path, None, 2)  # no limit: resumes and finishes
    assert done["status"] == "done"
    assert json.loads((tmp_path / "cells" / cell.id / "result.json").read_text())["attempt"] == 2


def test_a_lockstep_group_shares_its_time_limit_and_resumes(tmp_path, tiny_grid):
    """A group past its limit: every cell checkpoints and fails retryable; run again, each
    resumes and gives the numbers of the cell run alone without a limit."""
    from kdbench.engine.lockstep import run_group
    from kdbench.engine.train import time_limit
    from kdbench.runner import plan

    cells = plan(load_grid(tiny_grid("[kd, fitnet]", epochs=2))).cells
    alone = {c.id: run_cell(c, tmp_path / "alone")["metrics"] for c in cells}
    shared = tmp_path / "shared"
    (shared / "teachers").mkdir(parents=True)
    for f in (tmp_path / "alone" / "teachers").iterdir():  # the same teacher, not trained again
        if f.is_file():
            (shared / "teachers" / f.name).write_bytes(f.read_bytes())
    with time_limit(1e-9):
        first = run_group(cells, shared)
    assert [r["status"] for r in first] == ["failed", "failed"] and all(r["retryable"] for r in first)
    assert all((shared / "cells" / c.id / "checkpoint.pt").exists() for c in cells)
    again = run_group(cells, shared)
    assert [r["status"] for r in again] == ["done", "done"]
    for c, r in zip(cells, again, strict=True):
        got = {k: v for k, v in r["metrics"].items() if not k.endswith("_s")}
        assert got == {k: v for k, v in alone[c.id].items() if not k.endswith("_s")}
