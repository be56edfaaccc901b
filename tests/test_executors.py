"""Executors through the real libraries: submitit's local cluster and a local Ray instance.

Each test runs real cells (sklearn digits, tiny CNNs) in real worker processes and compares
their numbers with the same cells run inline: where a cell runs must not change what it gives.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from kdbench.cells import Cell, Job
from kdbench.config import load_grid
from kdbench.engine.cell import run_cell
from kdbench.executors.base import Events, RetryPolicy
from kdbench.runner import plan

pytestmark = pytest.mark.slow

KEYS = ("top1", "nll", "ece")


def _cells(tiny_grid, **kw) -> list[Cell]:
    return plan(load_grid(tiny_grid(**kw))).cells


def _jobs(cells: list[Cell], run_dir: Path) -> list[Job]:
    return [Job((c,), (1,), str(run_dir)) for c in cells]


def _run(executor, jobs: list[Job]) -> list:
    """Every result ``executor`` reports for ``jobs``."""
    results: list = []
    executor.run(jobs, Events(results.append), RetryPolicy())
    return results


def _inline(cells: list[Cell], run_dir: Path) -> dict[str, dict]:
    torch.set_num_threads(1)
    out = {}
    for c in cells:
        r = run_cell(c, run_dir)
        assert r.status == "done", r.error
        out[c.id] = r.metrics
    return out


def _wait_for(path_glob, root: Path, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = list(root.glob(path_glob))
        if got:
            return got[0]
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} never appeared under {root}")


def _starts(cell_dir: Path) -> int:
    return (cell_dir / "log.txt").read_text().count(" attempt ")


def test_submitit_local_cluster_gives_the_inline_numbers(tiny_grid, tmp_path):
    pytest.importorskip("submitit")
    from kdbench.executors.submitit_exec import SubmititExecutor

    cells = _cells(tiny_grid, methods="[ce, kd]", epochs=2)
    want = _inline(cells, tmp_path / "inline")
    run_dir = tmp_path / "sub"
    results = _run(SubmititExecutor(cluster="local", time_min=10, poll_s=0.2), _jobs(cells, run_dir))
    assert sorted(r.cell.id for r in results) == sorted(want)
    for r in results:
        assert r.status == "done", r.error
        for k in KEYS:
            assert r.metrics[k] == want[r.cell.id][k], k
    # the teacher was trained once, by its own job, before the kd cell ran
    assert len(list((run_dir / "teachers").glob("*.pt"))) == 1
    assert any("kdbench-teacher" in p.name or p.is_dir() for p in (run_dir / "submitit").iterdir())


def test_submitit_preempted_cell_is_requeued_and_completes(tiny_grid, tmp_path):
    pytest.importorskip("submitit")
    from kdbench.executors.submitit_exec import SubmititExecutor, _CellTask

    (cell,) = _cells(tiny_grid, methods="[ce]", epochs=8)
    want = _inline([cell], tmp_path / "inline")[cell.id]
    run_dir = tmp_path / "sub"
    ex = SubmititExecutor(cluster="local", time_min=10)._executor(str(run_dir), "kdbench-cell")
    job = ex.submit(_CellTask(), Job((cell,), (1,), str(run_dir)))
    cdir = run_dir / "cells" / cell.id
    _wait_for("checkpoint.pt", cdir)  # at least one epoch done, the cell is mid-way
    # what Slurm does to the task before a preemption or a time-out: USR2 to the task's process
    pid = json.loads((cdir / "worker.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)
    (result,) = job.result()
    assert result.status == "done", result.error
    assert _starts(cdir) == 2, (cdir / "log.txt").read_text()  # it really was stopped and requeued
    assert result.attempt == 2  # the requeue is counted
    for k in KEYS:
        assert result.metrics[k] == want[k], k


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_task_killed_mid_cell_is_retried_with_the_same_numbers(tiny_grid, tmp_path, local_ray):
    from kdbench.executors.ray_exec import RayExecutor

    cells = _cells(tiny_grid, methods="[ce, kd]", epochs=8)
    want = _inline(cells, tmp_path / "inline")
    run_dir = tmp_path / "ray"
    results: list = []
    args = (_jobs(cells, run_dir), Events(results.append), RetryPolicy())
    t = threading.Thread(target=RayExecutor(retries=2).run, args=args)
    t.start()
    victim = run_dir / "cells" / cells[0].id
    _wait_for("checkpoint.pt", victim)
    pid = json.loads((victim / "worker.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # the worker dies hard mid-cell: Ray retries the task
    t.join(timeout=600)
    assert not t.is_alive()
    assert len(results) == 2
    for r in results:
        assert r.status == "done", r.error
        for k in KEYS:
            assert r.metrics[k] == want[r.cell.id][k], k
    assert _starts(victim) == 2
    attempts = {r.cell.id: r.attempt for r in results}
    assert attempts == {cells[0].id: 2, cells[1].id: 1}  # Ray's retry is counted


def test_detach_status_and_collect_through_the_cli(tiny_grid, tmp_path):
    pytest.importorskip("submitit")
    from tests.conftest import kdbench_cli

    grid = tiny_grid(methods="[ce, kd]", epochs=2)
    grid.write_text(grid.read_text() + "executor: {kind: submitit, cluster: local, time_min: 10}\n")
    run_dir = tmp_path / "runs" / "tiny"
    r = kdbench_cli("run", str(grid), "--detach")
    assert r.returncode == 0, r.stderr
    assert "submitted 2 cell(s) to submitit" in r.stderr
    jobs = json.loads((run_dir / "jobs.json").read_text())
    assert len(jobs) == 2 and all(j["executor"] == "submitit" for j in jobs.values())
    s = kdbench_cli("status", str(run_dir))
    assert s.returncode == 0, s.stderr
    assert "submitted" in s.stdout or "running" in s.stdout or "done" in s.stdout
    # a second run while the jobs are queued or running never submits them again
    again = kdbench_cli("run", str(grid), "--detach")
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "jobs.json").read_text()) == jobs or "done" in again.stderr
    deadline = time.time() + 400
    while time.time() < deadline and len(list(run_dir.glob("cells/*/result.json"))) < 2:
        time.sleep(0.5)
    # collect: the results are imported, the leaderboard printed, nothing resubmitted
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    assert "| kd" in r.stdout and "| ce" in r.stdout
    s = kdbench_cli("status", str(run_dir))
    assert "2 done" in s.stdout, s.stdout
    assert len(list((run_dir / "submitit").iterdir())) <= 4  # teacher job + 2 cells (+ the %j template dir)


def test_local_workers_are_pinned_to_their_own_gpu(tiny_grid, tmp_path):
    from kdbench.executors.local import LocalExecutor
    from kdbench.executors.pool import gpu_for

    assert [gpu_for(i, [0, 1]) for i in range(3)] == ["0", "1", "0"]
    assert gpu_for(0, None) is None
    cells = _cells(tiny_grid, methods="[ce]", seeds="[0, 1]", epochs=1)
    results = _run(LocalExecutor(workers=2, gpus=[3, 5]), _jobs(cells, tmp_path))
    assert all(r.status == "done" for r in results), [r.error for r in results]
    # each worker saw only its own device (recorded in every result's environment)
    assert sorted(r.env["cuda_visible_devices"] for r in results) == ["3", "5"]


def test_submitit_runs_a_ddp_cell_as_one_task_per_rank(tiny_grid, tmp_path):
    pytest.importorskip("submitit")
    from kdbench.executors.submitit_exec import SubmititExecutor, ranks_of

    grid = tiny_grid(methods="[ce]", epochs=2)
    text = grid.read_text()
    grid.write_text(text.replace("\ntrain: {epochs: 2,", "\ntrain: {gpus_per_cell: 2, epochs: 2,"))
    (cell,) = _cells(lambda **kw: grid)
    assert ranks_of(cell) == (2, 1)
    run_dir = tmp_path / "sub"
    (r,) = _run(SubmititExecutor(cluster="local", time_min=10, poll_s=0.2), _jobs([cell], run_dir))
    assert r.status == "done", r.error
    assert r.env["ddp"]["world"] == 2  # the cell really ran on two ranks (submitit tasks)
    # one job of two tasks (the local cluster's own log files per task)
    logs = sorted(p.name for p in (run_dir / "submitit").glob("*/*_log.out"))
    assert [n.split("_")[1] for n in logs] == ["0", "1"], logs


def _done_metrics(run_dir: Path) -> dict[str, tuple[dict, int, str]]:
    """cell id -> (metrics without timings, pid that ran it, method) from the result files."""
    out = {}
    for f in run_dir.glob("cells/*/result.json"):
        r = json.loads(f.read_text())
        assert r["status"] == "done", r.get("error")
        m = {k: v for k, v in r["metrics"].items() if not k.endswith("_s")}
        out[f.parent.name] = (m, r["env"]["pid"], r["cell"]["method"]["name"])
    return out


@pytest.mark.parametrize(
    "executor",
    [
        "{kind: submitit, cluster: local, time_min: 10, poll_s: 0.2}",
        "{kind: ray, address: local, num_cpus: 2}",
    ],
)
def test_share_teacher_groups_are_one_job_on_submitit_and_ray(tiny_grid, tmp_path, executor):
    """With share_teacher, each lockstep group is one submitit / Ray job: kd and fitnet run in
    one process and give the numbers of the cells run inline and alone."""
    from tests.conftest import kdbench_cli

    if "submitit" in executor:
        pytest.importorskip("submitit")
    else:
        pytest.importorskip("ray")
    grid = tiny_grid(methods="[ce, kd, fitnet]", epochs=2)
    r = kdbench_cli("run", str(grid), "--out", str(tmp_path / "inline"))
    assert r.returncode == 0, r.stderr
    grid.write_text(grid.read_text() + f"executor: {executor[:-1]}, share_teacher: true}}\n")
    r = kdbench_cli("run", str(grid), "--out", str(tmp_path / "ext"))
    assert r.returncode == 0, r.stderr
    assert "running 3 cell(s) as 2 job(s) sharing teachers" in r.stderr, r.stderr
    got, want = _done_metrics(tmp_path / "ext"), _done_metrics(tmp_path / "inline")
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    pid = {method: p for _, p, method in got.values()}
    assert pid["kd"] == pid["fitnet"] != pid["ce"], pid
