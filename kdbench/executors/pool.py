"""Local worker processes for ``--workers N`` (the ``local`` executor's pool).

The pool is a few spawned processes, each running one cell at a time and sending its result
back over a pipe. A worker that dies hard (OOM killer, a segfault in a plugin, ``os._exit``)
fails only its own cell: the driver records the exit code or signal, starts a new worker and
goes on. Workers die with their driver: Linux delivers SIGKILL to them when it exits
(``PR_SET_PDEATHSIG``), and a watchdog thread checks the parent PID on every platform, so a
killed driver leaves no orphans holding CPUs or GPU memory.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from kdbench.artifacts import DiskError
from kdbench.cells import CellResult, Job
from kdbench.engine.train import StopRequested, stop_requested
from kdbench.errors import KdbenchError
from kdbench.executors.base import Events, RetryPolicy
from kdbench.procs import death_reason, die_with_parent

# --------------------------------------------------------------------------- worker side


def _worker_main(conn: Connection, threads: int, parent_pid: int) -> None:
    """Run jobs sent over ``conn`` until told to stop; send back progress rows and results."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides what Ctrl-C means
    from kdbench.engine.run import run_job
    from kdbench.engine.train import request_stop

    # SIGTERM (from the driver's shutdown, or Slurm/a container stopping the node): checkpoint
    # at the next step boundary, tell the driver, exit
    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    import torch

    torch.set_num_threads(threads)

    def progress(cell: Any):
        return lambda row, cid=cell.id: conn.send(("progress", cid, row))

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(("started", job.first.id, None))  # its time limit counts from here
        try:
            run_job(job, progress, lambda r: conn.send(("result", r.cell.id, r)))
        except StopRequested:
            conn.send(("stopped", job.first.id, None))
            return
        except KdbenchError as e:  # e.g. a full disk: the sweep stops, as it does inline
            conn.send(("error", job.first.id, (type(e).__name__, str(e), e.exit_code)))


# --------------------------------------------------------------------------- driver side


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
    def __init__(self, ctx: Any, threads: int, gpu: str | None = None):
        self.conn, child = ctx.Pipe()
        # not a daemon: a cell may start processes of its own (DataLoader workers); the driver
        # stops its workers itself (``_shutdown``), or the kernel does when the driver dies
        self.proc = ctx.Process(target=_worker_main, args=(child, threads, os.getpid()))
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
        #: the job it runs, and its cells that have no result yet (id -> cell); empty: idle
        self.job: Job | None = None
        self.cells: dict[str, Any] = {}
        self.started: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self.cells)

    def give(self, job: Job) -> None:
        """Send one job (a cell, or a group of cells run in lockstep)."""
        self.job, self.cells = job, {c.id: c for c in job.cells}
        self.started = None  # set when the worker says it began (a new worker imports first)
        self.conn.send(job)

    def overran(self, policy: RetryPolicy) -> bool:
        """True when its job has run past the time limit plus the policy's grace."""
        if policy.time_limit is None or self.started is None:
            return False
        return time.monotonic() - self.started > policy.time_limit + policy.kill_grace()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass


class WorkerFailed(KdbenchError):
    """A worker reported an error that stops the sweep (e.g. the disk is full)."""


class _Pool:
    """Spawned workers taking jobs from a queue; a dead or hung worker fails its cells and is
    replaced. Results pass through the retry policy; a job to retry joins the queue again."""

    def __init__(
        self, jobs: list[Job], n_workers: int, events: Events, policy: RetryPolicy, gpus: list[int] | None
    ):
        self.ctx = mp.get_context("spawn")  # fork after torch initialised its thread pools is unsafe
        self.queue: deque[Job] = deque(jobs)
        self.events, self.policy = events, policy
        self.threads = jobs[0].threads if jobs else 1
        self.gpus = gpus if gpus is not None else default_gpus(n_workers)
        self.workers = [self._new(i) for i in range(min(n_workers, len(jobs)))]

    def _new(self, slot: int) -> _Worker:
        return _Worker(self.ctx, self.threads, gpu_for(slot, self.gpus))

    def handle(self, w: _Worker, result: CellResult) -> None:
        result = self.policy.check(result)
        if result.retry_attempt and w.job is not None:
            self.queue.append(w.job.only({result.cell.id}, self.policy.attempts))
        self.events.result(result)

    def give_work(self) -> None:
        for i, w in enumerate(self.workers):
            if not w.busy and self.queue:
                if not w.proc.is_alive():
                    self.workers[i] = w = self._new(i)
                w.give(self.queue.popleft())

    def check(self, i: int, w: _Worker) -> None:
        """Hear worker ``i``; fail its unfinished cells when it died or overran its time limit."""
        _drain(w, lambda r: self.handle(w, r), self.events.progress)
        overran = w.busy and w.overran(self.policy) and w.proc.is_alive()
        if overran:
            w.proc.kill()
        if not (w.busy and (overran or not w.proc.is_alive())):
            return
        w.proc.join()
        lost, w.cells = list(w.cells.values()), {}
        for cell in lost:
            reason = _timed_out(self.policy) if overran else _died(w.proc.exitcode)
            _log_failure(Path(w.job.run_dir), cell, reason)
            self.handle(w, CellResult.failed(cell, w.job.attempt_of(cell.id), reason, retryable=True))
        if self.queue:
            self.workers[i] = self._new(i)

    def run(self) -> None:
        try:
            while self.queue or any(w.busy for w in self.workers):
                self.give_work()
                busy = [w for w in self.workers if w.busy]
                wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5)
                if stop_requested():  # SIGTERM to the driver: workers checkpoint and stop (finally)
                    raise StopRequested("stop requested")
                for i, w in enumerate(self.workers):
                    if w.busy:
                        self.check(i, w)
        finally:
            _shutdown(self.workers)


def run_pool(
    jobs: list[Job], n_workers: int, events: Events, policy: RetryPolicy, gpus: list[int] | None = None
) -> None:
    """Run ``jobs`` on ``n_workers`` spawned processes, every cell's result to ``events``.

    A job is a cell, or a lockstep group one worker runs sharing its teacher. A worker that dies
    fails the cells it had not finished (the exit code or signal as error, retryable) and is
    replaced; the other jobs go on. ``policy.time_limit``: enforced by the cell itself at its step
    boundaries, and by killing a worker that overruns it by the policy's grace (a hang in
    native code). ``policy`` decides which failed cells run again (from their checkpoint).
    """
    if jobs:
        _Pool(jobs, n_workers, events, policy, gpus).run()


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
                err = DiskError(message)
            raise err


def _log_failure(run_dir: Path, cell: Any, reason: str) -> None:
    try:  # leave the reason where the cell's own log is
        with open(run_dir / "cells" / cell.id / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} failed: {reason}\n")
    except OSError:
        pass


def _died(exitcode: int | None) -> str:
    return f"worker process {death_reason(exitcode)} while running this cell"


def _timed_out(policy: RetryPolicy) -> str:
    from kdbench.engine.train import format_seconds

    return (
        f"time limit of {format_seconds(policy.time_limit or 0.0)} reached and the cell did not stop at a "
        f"step boundary within {format_seconds(policy.kill_grace())}: its worker was killed (the last "
        "checkpoint is kept)"
    )


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
