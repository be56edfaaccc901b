"""Per-cell time limits and retries (issue 11, item 8): the parts that need no process."""

from __future__ import annotations

import json

import pytest

from kdbench.cells import CellResult, Job
from kdbench.config import ConfigError, load_grid, parse_duration
from kdbench.engine.cell import run_cell
from kdbench.executors.base import RetryPolicy, this_attempt
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
        from rich.console import Console

        from kdbench.runner import build_executor, plan

        build_executor(plan(load_grid(grid)).executor, None, Console())


def test_only_infrastructure_failures_are_retried(tiny_grid):
    from kdbench.runner import plan

    cell = plan(load_grid(tiny_grid("[ce]", epochs=1))).cells[0]
    policy = RetryPolicy(retries=2)
    policy.track([Job((cell,), (1,), ".")])
    nan = CellResult.failed(cell, 1, "non-finite loss at epoch 1")
    assert policy.check(nan).retry_attempt is None  # it would fail again
    died = CellResult.failed(cell, 1, "killed by signal SIGKILL", retryable=True)
    assert policy.check(died).retry_attempt == 2 and policy.attempts[cell.id] == 2
    assert policy.check(died).retry_attempt == 3 and policy.attempts[cell.id] == 3
    assert policy.check(died).retry_attempt is None  # two retries used
    assert policy.attempts[cell.id] == 3
    assert RetryPolicy(retries=0).check(died).retry_attempt is None


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
    assert r.status == "failed" and r.retryable, r
    assert r.error.startswith("TimeLimitReached: time limit of 1e-09 s reached at train epoch 1 step 0")
    assert (tmp_path / "cells" / cell.id / "checkpoint.pt").exists()
    done = run_cell(cell, tmp_path, None, 2)  # no limit: resumes and finishes
    assert done.status == "done"
    assert json.loads((tmp_path / "cells" / cell.id / "result.json").read_text())["attempt"] == 2


def test_a_lockstep_group_shares_its_time_limit_and_resumes(tmp_path, tiny_grid):
    """A group past its limit: every cell checkpoints and fails retryable; run again, each
    resumes and gives the numbers of the cell run alone without a limit."""
    from kdbench.engine.lockstep import run_group
    from kdbench.engine.train import time_limit
    from kdbench.runner import plan

    cells = plan(load_grid(tiny_grid("[kd, fitnet]", epochs=2))).cells
    alone = {c.id: run_cell(c, tmp_path / "alone").metrics for c in cells}
    shared = tmp_path / "shared"
    (shared / "teachers").mkdir(parents=True)
    for f in (tmp_path / "alone" / "teachers").iterdir():  # the same teacher, not trained again
        if f.is_file():
            (shared / "teachers" / f.name).write_bytes(f.read_bytes())
    with time_limit(1e-9):
        first = run_group(cells, shared)
    assert [r.status for r in first] == ["failed", "failed"] and all(r.retryable for r in first)
    assert all((shared / "cells" / c.id / "checkpoint.pt").exists() for c in cells)
    again = run_group(cells, shared)
    assert [r.status for r in again] == ["done", "done"]
    for c, r in zip(cells, again, strict=True):
        got = {k: v for k, v in r.metrics.items() if not k.endswith("_s")}
        assert got == {k: v for k, v in alone[c.id].items() if not k.endswith("_s")}


def test_a_teacher_without_its_checksum_is_trained_again(tmp_path, tiny_grid):
    """A crash between writing the weights and their checksum sidecar leaves weights every cell
    would reject; the next cell that needs the teacher trains it again instead of failing."""
    from kdbench.artifacts import sidecar
    from kdbench.engine.cell import prepare_teacher
    from kdbench.runner import plan

    cell = plan(load_grid(tiny_grid("[kd]", epochs=1))).cells[0]
    prepare_teacher(cell, tmp_path)
    weights = tmp_path / "teachers" / f"{cell.teacher.id}.pt"
    first = weights.read_bytes()
    sidecar(weights).unlink()  # the crash
    r = run_cell(cell, tmp_path)
    assert r.status == "done", r.error
    assert sidecar(weights).exists() and weights.read_bytes() == first  # the same teacher, again
