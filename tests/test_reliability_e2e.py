"""End-to-end faults on real runs (issue 16, issue 7 item 6): dying workers, a killed driver
and its workers, scheduling-independent numbers, corrupted teachers and checkpoints, a full
disk and a read-only archive. Tiny grids on scikit-learn's digits."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdbench.procs import cpu_budget
from tests.conftest import done_metrics as metrics
from tests.conftest import kdbench_cli
from tests.test_reliability import plugin_site, run_unprivileged, tiny  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def rows(run_dir: Path) -> dict[str, tuple[str, str | None]]:
    """cell label -> (status, error) from the store."""
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        out = {}
        for cfg, status, error in db.execute("SELECT config, status, error FROM cells"):
            c = json.loads(cfg)
            out[f"{c['method']['label']}/{c['seed']}"] = (status, error)
        return out
    finally:
        db.close()


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out |= {int(t) for t in text}
    return out


def alive(pid: int) -> bool:
    try:
        state = next(
            ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:")
        )
    except (FileNotFoundError, StopIteration):
        return False
    return "Z" not in state.split()[1]  # a zombie has exited


def with_threads(grid: Path, threads: int) -> Path:
    grid.write_text(grid.read_text().replace("eval:", f"executor: {{threads: {threads}}}\neval:"))
    return grid


# --------------------------------------------------------------------------- dying workers


def test_a_worker_that_dies_hard_fails_only_its_cell(plugin_site, tmp_path):  # noqa: F811
    grid = tiny(tmp_path, "[crash_exit, ce, crash_segv, kd]")
    # the site also holds the twin plugins claiming `twin`: a grid that does not use it runs
    env = {"PYTHONPATH": str(plugin_site)}
    r = kdbench_cli("run", str(grid), "--workers", "2", env=env)
    assert r.returncode == 1, r.stderr  # some cells failed, the others are recorded
    got = rows(tmp_path / "runs" / "tiny")
    assert got["ce/0"] == ("done", None) and got["kd/0"] == ("done", None), got
    assert got["crash_exit/0"][0] == "failed" and "exited with code 1" in got["crash_exit/0"][1]
    assert got["crash_segv/0"][0] == "failed" and "signal SIGSEGV" in got["crash_segv/0"][1]
    assert "Traceback" not in r.stderr

    # reports: failed cells are rows with their status and error in csv and json
    run_dir = str(tmp_path / "runs" / "tiny")
    c = kdbench_cli("report", run_dir, "--format", "csv", env=env)
    assert c.returncode == 0, c.stderr
    table = list(csv.DictReader(io.StringIO(c.stdout)))
    assert "status" in table[0], c.stdout
    failed = [row for row in table if row["status"] == "failed"]
    assert failed and any("SIGSEGV" in json.dumps(row) for row in failed), c.stdout
    j = kdbench_cli("report", run_dir, "--format", "json", env=env)
    assert "SIGSEGV" in j.stdout and "exited with code 1" in j.stdout, j.stdout
    m = kdbench_cli("report", run_dir, "--metric", "top7", env=env)
    assert m.returncode == 2 and "top1" in m.stderr, m.stderr


# --------------------------------------------------------------------------- scheduling


def test_numbers_do_not_depend_on_scheduling_and_a_killed_pool_leaves_no_orphans(tmp_path):
    """inline, --workers 2, and a --workers 2 run killed with SIGKILL then resumed inline (one of
    its checkpoints truncated on the way) give bitwise-equal metrics; the killed driver's workers
    exit within seconds."""
    grid = tiny(tmp_path, "[ce, kd]", "[0, 1]", epochs=6)
    out = {k: tmp_path / k for k in ("inline", "pool", "killed")}

    def mid_cell(ckpt: Path) -> bool:
        """A checkpoint of a cell with epochs left: killing now cannot race its last epoch."""
        lines = (ckpt.parent / "metrics.jsonl").read_text().splitlines() if ckpt.exists() else []
        return 0 < len(lines) <= 3

    r = kdbench_cli("run", str(grid), "--out", str(out["inline"]))
    assert r.returncode == 0, r.stderr
    r = kdbench_cli("run", str(grid), "--out", str(out["pool"]), "--workers", "2")
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kdbench.cli",
            "run",
            str(grid),
            "--out",
            str(out["killed"]),
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    workers: set[int] = set()
    while time.time() < deadline:
        workers = {
            p for p in children(proc.pid) if "kdbench" in _cmdline(p) or "multiprocessing" in _cmdline(p)
        }
        if len(workers) >= 2 and any(mid_cell(c) for c in out["killed"].glob("cells/*/checkpoint.pt")):
            break
        if proc.poll() is not None:
            pytest.fail("the sweep finished before it could be killed")
        time.sleep(0.01)
    else:
        pytest.fail("no worker reached a checkpoint in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "workers outlived their driver"

    ckpts = list(out["killed"].glob("cells/*/checkpoint.pt"))
    assert ckpts, "killed between a checkpoint and the end of its cell; rerun"
    # a checkpoint cut short (a driver killed mid-write on a filesystem without atomic rename)
    data = ckpts[0].read_bytes()
    ckpts[0].write_bytes(data[: len(data) // 2])
    r = kdbench_cli("run", str(grid), "--out", str(out["killed"]))
    assert r.returncode == 0, r.stderr
    assert ckpts[0].with_name("checkpoint.pt.corrupt").exists()
    log = (ckpts[0].parent / "log.txt").read_text()
    assert "checkpoint.pt.corrupt" in log and "from scratch" in log

    a, b, c = (metrics(out[k]) for k in ("inline", "pool", "killed"))
    assert len(a) == 4 and a.keys() == b.keys() == c.keys()
    for cid in a:
        assert a[cid] == b[cid], f"inline and --workers 2 differ in {cid}"
        assert a[cid] == c[cid], f"inline and killed-then-resumed differ in {cid}"
    envs = [json.loads(f.read_text())["env"] for f in out["pool"].glob("cells/*/result.json")]
    assert {e["threads"] for e in envs} == {1}
    shown = kdbench_cli("report", str(out["pool"]), "--details")
    assert "1 thread" in shown.stdout, shown.stdout


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --------------------------------------------------------------------------- cached teacher


def test_a_corrupted_cached_teacher_fails_the_cells_that_use_it(tmp_path):
    grid = tiny(tmp_path, "[ce, kd]", "[0]")
    run_dir = tmp_path / "runs" / "tiny"
    assert kdbench_cli("run", str(grid)).returncode == 0
    (weights,) = run_dir.glob("teachers/*.pt")
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0x55
    weights.write_bytes(bytes(data))

    grid = with_threads(tiny(tmp_path, "[ce, kd]", "[0, 1]"), 2)
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 1, r.stderr
    got = rows(run_dir)
    assert got["ce/1"] == ("done", None)
    status, error = got["kd/1"]
    assert status == "failed" and str(weights) in error and "corrupt" in error and "delete" in error, error
    if cpu_budget() >= 2:  # the resume computes with another thread count than the run before
        assert "earlier cells" in r.stderr and "threads" in r.stderr, r.stderr
    # following the advice rebuilds it
    weights.unlink()
    assert kdbench_cli("run", str(grid)).returncode == 0
    assert rows(run_dir)["kd/1"] == ("done", None)


# --------------------------------------------------------------------------- disk


def test_disk_full_while_a_teacher_is_saved(tmp_path, monkeypatch, capsys):
    """ENOSPC injected on the write path (no small filesystem to fill here): one line naming
    the file and the cause, exit 2, no temp file left; the rerun finishes."""
    from kdbench import cli

    grid = tiny(tmp_path, "[kd]")
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if "/teachers/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    monkeypatch.setattr(sys, "argv", ["kdbench", "run", str(grid)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "/teachers/" in lines[0], err
    assert "Traceback" not in err
    run_dir = tmp_path / "runs" / "tiny"
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]

    monkeypatch.setattr(os, "fsync", real_fsync)
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    assert rows(run_dir)["kd/0"] == ("done", None)


def test_a_finished_run_in_a_read_only_directory_writes_nothing(tmp_path):
    grid = tiny(tmp_path, "[ce]")
    run_dir = tmp_path / "runs" / "tiny"
    assert kdbench_cli("run", str(grid)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        r = run_unprivileged("run", str(grid), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "1 of 1 cells already done" in r.stderr
        assert "| ce" in r.stdout  # the leaderboard, read from the read-only store
        rep = run_unprivileged("report", str(run_dir), cwd=tmp_path)
        assert rep.returncode == 0 and "| ce" in rep.stdout, rep.stderr
    finally:
        for p in [run_dir, *run_dir.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


# --------------------------------------------------------------------------- two drivers


def test_two_real_drivers_on_one_run_directory(tmp_path):
    """Two `kdbench run` started together on one directory: one runs, the other refuses at
    once naming the first's PID, and every cell is trained once."""
    grid = tiny(tmp_path, "[ce]", "[0, 1, 2]", epochs=4)
    run_dir = tmp_path / "runs" / "tiny"
    cmd = [sys.executable, "-m", "kdbench.cli", "run", str(grid)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], errs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert f"PID {procs[winner].pid}" in errs[loser] and "in use by another" in errs[loser], errs[loser]
    assert len(list(run_dir.glob("cells/*/result.json"))) == 3
    for m in run_dir.glob("cells/*/metrics.jsonl"):
        epochs = [json.loads(ln)["epoch"] for ln in m.read_text().splitlines() if '"train"' in ln]
        assert epochs == [0, 1, 2, 3] or epochs == [1, 2, 3, 4], (m, epochs)


# --------------------------------------------------------------------------- time limits, retries


def attempts_of(run_dir: Path) -> dict[str, tuple[str, int, str | None]]:
    """cell label -> (status, attempts, error) from the store."""
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        out = {}
        for cfg, status, n, error in db.execute("SELECT config, status, attempts, error FROM cells"):
            c = json.loads(cfg)
            out[f"{c['method']['label']}/{c['seed']}"] = (status, n, error)
        return out
    finally:
        db.close()


def with_executor(grid: Path, block: str) -> Path:
    """``grid`` with its ``executor:`` line set to ``block``."""
    lines = [ln for ln in grid.read_text().splitlines() if not ln.startswith("executor:")]
    grid.write_text("\n".join([*lines, f"executor: {block}"]) + "\n")
    return grid


def test_time_limit_checkpoints_and_retries_resume_to_the_same_numbers(plugin_site, tmp_path):  # noqa: F811
    """A cell slower than `executor.time_limit` stops at a step boundary with its checkpoint;
    `retries` runs it again from there until it finishes, with the numbers of an unlimited run."""
    env = {"PYTHONPATH": str(plugin_site)}
    free = tiny(tmp_path, "[slow]", epochs=3, name="free.yaml")
    r = kdbench_cli("run", str(free), "--out", str(tmp_path / "free"), env=env)
    assert r.returncode == 0, r.stderr

    # no retries: the cell fails with the reason, its checkpoint kept; the sweep exits 1
    grid = with_executor(tiny(tmp_path, "[slow]", epochs=3), "{time_limit: 3s}")
    out = tmp_path / "limited"
    r = kdbench_cli("run", str(grid), "--out", str(out), env=env)
    assert r.returncode == 1, r.stderr
    ((status, n, error),) = attempts_of(out).values()
    assert status == "failed" and n == 1 and "time limit of 3 s reached at train epoch" in error, error
    assert list(out.glob("cells/*/checkpoint.pt")), "the checkpoint must be kept"

    # retries: each attempt resumes where the last stopped, until the cell is done
    with_executor(grid, "{time_limit: 3s, retries: 8}")
    r = kdbench_cli("run", str(grid), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert "retrying (attempt 3)" in r.stderr, r.stderr
    ((status, n, error),) = attempts_of(out).values()
    assert status == "done" and n >= 3, (n, error)
    assert metrics(out) == metrics(tmp_path / "free")
    log = next(out.glob("cells/*/log.txt")).read_text()
    assert "resum" in log.lower(), log


def test_pool_kills_a_hung_cell_at_its_time_limit_and_retries_a_dead_worker(plugin_site, tmp_path):  # noqa: F811
    """A cell that never reaches a step boundary is killed past its limit (plus the grace);
    a cell whose worker died is run again and finishes; every attempt is counted."""
    env = {"PYTHONPATH": str(plugin_site), "KDBENCH_TEST_FLAKY": str(tmp_path / "flaky.mark")}
    grid = with_executor(tiny(tmp_path, "[hang, flaky, ce]"), "{time_limit: 5, retries: 2, workers: 2}")
    r = kdbench_cli("run", str(grid), env=env, timeout=400)  # three kills at ~15 s each, not a hang
    assert r.returncode == 1, r.stderr
    got = attempts_of(tmp_path / "runs" / "tiny")
    status, n, error = got["hang/0"]
    assert status == "failed" and n == 3, got
    assert "time limit of 5 s reached" in error and "worker was killed" in error, error
    status, n, error = got["flaky/0"]  # died once (exit 1), then finished
    assert status == "done" and n >= 2, got
    assert (
        "exited with code 1"
        in (tmp_path / "runs/tiny/cells")
        .joinpath(json.loads((tmp_path / "runs/tiny/cells.json").read_text())[1], "log.txt")
        .read_text()
    )
    assert got["ce/0"][:2] == ("done", 1), got
    assert "retrying (attempt 2)" in r.stderr and "Traceback" not in r.stderr, r.stderr
