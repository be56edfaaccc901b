"""Local worker processes for ``--workers N``, and how many CPUs this process may use.

The pool is a few spawned processes, each running one cell at a time and sending its result
back over a pipe. A worker that dies hard (OOM killer, a segfault in a plugin, ``os._exit``)
fails only its own cell: the driver records the exit code or signal, starts a new worker and
goes on. Workers die with their driver: Linux delivers SIGKILL to them when it exits
(``PR_SET_PDEATHSIG``), and a watchdog thread checks the parent PID on every platform, so a
killed driver leaves no orphans holding CPUs or GPU memory.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from kdbench.engine.train import StopRequested, stop_requested
from kdbench.errors import KdbenchError

#: seconds between a worker's checks that its driver is alive (the portable fallback)
WATCHDOG_PERIOD = 0.5

# --------------------------------------------------------------------------- CPU budget


def _cgroup_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"), fs: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max`` or v1 CFS quota) of this process, or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: float | None = None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        ctrl = set(controllers.split(","))
        if controllers == "":  # v2: one unified hierarchy
            dirs, read = [fs], _v2_quota
        elif "cpu" in ctrl:  # v1: the cpu controller's own hierarchy
            dirs, read = [fs / controllers, fs / "cpu", fs / "cpu,cpuacct"], _v1_quota
        else:
            continue
        for base in dirs:
            # the effective limit is the tightest one on the path from the root to this cgroup
            d = base / rel.lstrip("/")
            while True:
                q = read(d)
                if q is not None:
                    best = q if best is None else min(best, q)
                if d == base or base not in d.parents:
                    break
                d = d.parent
    return best


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask (Slurm ``--cpus-per-task``, taskset),
    capped by the cgroup CPU quota (containers); never the machine's core count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        n = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


# --------------------------------------------------------------------------- worker side


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit within seconds of ``parent_pid`` dying."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog below still works
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="kdbench-parent-watchdog", daemon=True).start()


def _worker_main(conn: Connection, run_dir: str, threads: int, parent_pid: int) -> None:
    """Run cells sent over ``conn`` until told to stop; send back progress rows and results."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides what Ctrl-C means
    from kdbench.engine.train import StopRequested, request_stop

    # SIGTERM (from the driver's shutdown, or Slurm/a container stopping the node): checkpoint
    # at the next step boundary, tell the driver, exit
    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    import torch

    torch.set_num_threads(threads)

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        job, attempts, limit = task
        first = _cell_id(job[0] if isinstance(job, list) else job)
        conn.send(("started", first, None))  # its time limit counts from here
        try:
            _run_job(conn, job, Path(run_dir), attempts, limit)
        except StopRequested:
            conn.send(("stopped", first, None))
            return
        except KdbenchError as e:  # e.g. a full disk: the sweep stops, as it does inline
            conn.send(("error", first, (type(e).__name__, str(e), e.exit_code)))


def _run_job(conn: Connection, job: Any, run_dir: Path, attempts: dict[str, int], limit: float | None):
    """One cell, or a lockstep group sharing its teacher (a list); each result sent as it comes."""
    from kdbench.engine.cell import run_cell

    def progress(cell: Any):
        return lambda row, cid=_cell_id(cell): conn.send(("progress", cid, row))

    if isinstance(job, list):
        from kdbench.engine.lockstep import run_group
        from kdbench.engine.train import time_limit

        def send(result: dict) -> None:
            conn.send(("result", _cell_id(result["cell"]), result))

        with time_limit(limit):
            run_group(job, run_dir, progress, attempts, send)
        return
    result = run_cell(job, run_dir, progress(job), attempts[_cell_id(job)], limit)
    conn.send(("result", _cell_id(job), result))


# --------------------------------------------------------------------------- driver side


def death_reason(exitcode: int | None) -> str:
    """``-11`` -> "killed by signal SIGSEGV", ``1`` -> "exited with code 1"."""
    if exitcode is None:
        return "vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = {"SIGSEGV": " (a crash in native code)", "SIGKILL": " (out of memory?)"}.get(name, "")
        return f"killed by signal {name}{hint}"
    return f"exited with code {exitcode}"


def gpu_for(slot: int, gpus: list[int] | None) -> str | None:
    """CUDA_VISIBLE_DEVICES of worker ``slot``: its own GPU from ``gpus`` (round robin), or None."""
    if not gpus:
        return None
    return str(gpus[slot % len(gpus)])


def default_gpus(n_workers: int) -> list[int] | None:
    """With several workers and several visible GPUs, one GPU per worker (None: leave CUDA be)."""
    if n_workers < 2:
        return None
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if n < 2:
        return None
    if visible:  # keep the user's numbering: pin to the ids they made visible
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return [int(v) for v in ids] if all(v.isdigit() for v in ids) else None
    return list(range(n))


class _Worker:
    def __init__(self, ctx: Any, run_dir: Path, threads: int, gpu: str | None = None):
        self.conn, child = ctx.Pipe()
        # not a daemon: a cell may start processes of its own (DataLoader workers); the driver
        # stops its workers itself (``_shutdown``), or the kernel does when the driver dies
        self.proc = ctx.Process(target=_worker_main, args=(child, str(run_dir), threads, os.getpid()))
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpu is not None:  # a spawned child inherits the environment at start()
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        try:
            self.proc.start()
        finally:
            if gpu is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        child.close()
        #: the cells of the job it runs that have no result yet (id -> cell); empty: idle
        self.cells: dict[str, Any] = {}
        self.started: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self.cells)

    def give(self, job: Any, attempts: dict[str, int], time_limit: float | None) -> None:
        """Send one cell, or a group of cells (a list) to run in lockstep."""
        cells = job if isinstance(job, list) else [job]
        self.cells = {_cell_id(c): c for c in cells}
        self.started = None  # set when the worker says it began (a new worker imports first)
        self.conn.send((job, {k: attempts[k] for k in self.cells}, time_limit))

    def overran(self, time_limit: float | None) -> bool:
        """True when its cell has run past ``time_limit`` plus :func:`kill_grace`."""
        if time_limit is None or self.started is None:
            return False
        return time.monotonic() - self.started > time_limit + kill_grace(time_limit)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass


class WorkerFailed(KdbenchError):
    """A worker reported an error that stops the sweep (e.g. the disk is full)."""


def run_pool(
    todo: list[dict],
    run_dir: Path,
    n_workers: int,
    threads: int,
    attempts: dict[str, int],
    on_result: Callable[[dict], None],
    on_progress: Callable[[dict, dict], None] | None = None,
    gpus: list[int] | None = None,
    time_limit: float | None = None,
    retries: int = 0,
) -> None:
    """Run ``todo`` on ``n_workers`` spawned processes; ``on_result`` gets every cell's result.

    An item of ``todo`` is a cell, or a list of cells that one worker runs as a lockstep group
    sharing their teacher (:func:`kdbench.engine.lockstep.run_group`). A worker that dies fails
    the cells it had not finished (status "failed", the exit code or signal as error) and
    is replaced; the other cells go on. ``time_limit``: seconds per attempt, enforced by the
    cell itself at its step boundaries, and by killing a worker that overruns it by
    :func:`kill_grace` (a hang in native code). ``retries``: a cell whose worker died or that
    hit the time limit runs again up to that many times (resuming from its checkpoint);
    ``on_result`` also gets each failed attempt, marked by :func:`retry_if_allowed`.
    """
    ctx = mp.get_context("spawn")  # fork after torch initialised its thread pools is unsafe
    queue = deque(todo)
    first = dict(attempts)
    by_id = {_cell_id(c): c for job in todo for c in (job if isinstance(job, list) else [job])}

    def handle(result: dict) -> None:
        if retry_if_allowed(result, attempts, first, retries):
            queue.append(by_id[_cell_id(result["cell"])])
        on_result(result)

    gpus = gpus if gpus is not None else default_gpus(n_workers)
    workers = [_Worker(ctx, run_dir, threads, gpu_for(i, gpus)) for i in range(min(n_workers, len(todo)))]
    try:
        while queue or any(w.busy for w in workers):
            for i, w in enumerate(workers):
                if not w.busy and queue:
                    if not w.proc.is_alive():
                        workers[i] = w = _Worker(ctx, run_dir, threads, gpu_for(i, gpus))
                    w.give(queue.popleft(), attempts, time_limit)
            busy = [w for w in workers if w.busy]
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5)
            if stop_requested():  # SIGTERM to the driver: workers checkpoint and stop (finally)
                raise StopRequested("stop requested")
            for i, w in enumerate(workers):
                if not w.busy:
                    continue
                _drain(w, handle, on_progress)
                overran = w.busy and w.overran(time_limit) and w.proc.is_alive()
                if overran:
                    w.proc.kill()
                if w.busy and (overran or not w.proc.is_alive()):
                    w.proc.join()
                    lost, w.cells = list(w.cells.values()), {}
                    for cell in lost:
                        a = attempts[_cell_id(cell)]
                        handle(
                            _timed_out(cell, a, time_limit or 0.0, run_dir)
                            if overran
                            else _died(cell, a, w.proc.exitcode, run_dir)
                        )
                    if queue:
                        workers[i] = _Worker(ctx, run_dir, threads, gpu_for(i, gpus))
    finally:
        _shutdown(workers)


def _drain(w: _Worker, on_result: Callable, on_progress: Callable | None) -> None:
    """Handle every message waiting from ``w``."""
    while w.busy:
        try:
            if not w.conn.poll():
                return
            kind, cid, payload = w.conn.recv()
        except (EOFError, OSError):  # it is dying: let it finish so the caller sees its exit code
            w.proc.join(5)
            return
        if kind == "started":
            w.started = time.monotonic()
        elif kind == "progress":
            if on_progress is not None and cid in w.cells:
                on_progress(w.cells[cid], payload)
        elif kind == "stopped":  # checkpointed on a stop request; the cells stay to run
            w.cells = {}
        elif kind == "result":
            w.cells.pop(cid, None)
            on_result(payload)
        else:
            name, message, code = payload
            err = WorkerFailed(message)
            err.exit_code = code
            if name == "DiskError":
                from kdbench.artifacts import DiskError

                err = DiskError(message)
            raise err


def kill_grace(time_limit: float) -> float:
    """Seconds past its time limit after which a worker that did not stop is killed."""
    return min(300.0, max(10.0, 0.1 * time_limit))


def retry_if_allowed(result: dict, attempts: dict[str, int], first: dict[str, int], retries: int) -> bool:
    """True when failed ``result`` is retryable (its worker died, it hit the time limit) and its
    cell has retries left; then the cell's next attempt is counted in ``attempts`` and the result
    says so (``retry_attempt``). A NaN loss or a bad config is never retried: it would fail again."""
    cid = _cell_id(result["cell"])
    if result.get("status") != "failed" or not result.get("retryable"):
        return False
    if attempts[cid] - first[cid] >= retries:
        return False
    attempts[cid] += 1
    result["retry_attempt"] = attempts[cid]
    return True


def _cell_id(cell: Any) -> str:
    return cell["id"] if isinstance(cell, dict) else cell.id


def _log_failure(run_dir: Path, cell: Any, reason: str) -> None:
    try:  # leave the reason where the cell's own log is
        with open(run_dir / "cells" / _cell_id(cell) / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} failed: {reason}\n")
    except OSError:
        pass


def _died(cell: dict, attempt: int, exitcode: int | None, run_dir: Path) -> dict:
    reason = f"worker process {death_reason(exitcode)} while running this cell"
    _log_failure(run_dir, cell, reason)
    return {"cell": cell, "status": "failed", "error": reason, "attempt": attempt, "retryable": True}


def _timed_out(cell: dict, attempt: int, limit: float, run_dir: Path) -> dict:
    from kdbench.engine.train import format_seconds

    reason = (
        f"time limit of {format_seconds(limit)} reached and the cell did not stop at a step boundary "
        f"within {format_seconds(kill_grace(limit))}: its worker was killed (the last checkpoint is kept)"
    )
    _log_failure(run_dir, cell, reason)
    return {"cell": cell, "status": "failed", "error": reason, "attempt": attempt, "retryable": True}


def _shutdown(workers: list[_Worker], grace: float = 30.0) -> None:
    """Ask idle workers to stop; terminate busy ones, which checkpoint at their next step and
    exit (their cells resume from there); a worker still busy after ``grace`` s is killed."""
    for w in workers:
        if not w.busy:
            w.stop()
        elif w.proc.is_alive():
            w.proc.terminate()
    deadline = time.monotonic() + grace
    for w in workers:
        w.proc.join(max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()
