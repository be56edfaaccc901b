"""The executor interface, the one retry / time-limit policy, and what an outside worker runs.

An executor takes typed :class:`~kdbench.cells.Job` s (a cell, or a lockstep group of cells)
and reports a typed :class:`~kdbench.cells.CellResult` per cell through :class:`Events`. The
runner never asks which executor it has: ``local`` (inline for one worker, a process pool
otherwise), ``submitit`` and ``ray`` are the same kind of plugin.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdbench.artifacts import write_json_atomic
from kdbench.cells import Cell, CellResult, Job

#: called in the driver with every result (a failed attempt that runs again has ``retry_attempt``)
OnResult = Callable[[CellResult], None]
#: called in the driver with a cell's per-epoch progress row
OnProgress = Callable[[Cell, dict[str, Any]], None]


@dataclass
class Events:
    """What the driver hears from an executor."""

    result: OnResult
    progress: OnProgress | None = None

    def progress_for(self, cell: Cell) -> Callable[[dict[str, Any]], None] | None:
        if self.progress is None:
            return None
        on = self.progress
        return lambda row: on(cell, row)


class RetryPolicy:
    """``executor.time_limit`` per attempt and how often a retryable failure runs again.

    A failure is retryable when its worker died or it hit the time limit (``CellResult.retryable``);
    a NaN loss or a config error is never retried: it would fail again. Every executor asks
    :meth:`check` about every result; the attempt numbers live here.
    """

    def __init__(self, retries: int = 0, time_limit: float | None = None):
        self.retries = max(0, int(retries))
        self.time_limit = time_limit
        self.attempts: dict[str, int] = {}
        self.first: dict[str, int] = {}

    def track(self, jobs: list[Job]) -> None:
        """Count attempts from those the jobs were planned with."""
        for j in jobs:
            for cid, a in zip(j.ids, j.attempts, strict=True):
                self.attempts.setdefault(cid, a)
                self.first.setdefault(cid, a)

    def check(self, result: CellResult) -> CellResult:
        """``result``, marked with the next attempt's number when its cell runs again."""
        cid = result.cell.id
        if result.status != "failed" or not result.retryable:
            return result
        if self.attempts.get(cid, result.attempt) - self.first.get(cid, result.attempt) >= self.retries:
            return result
        self.attempts[cid] = self.attempts.get(cid, result.attempt) + 1
        return result.model_copy(update={"retry_attempt": self.attempts[cid]})

    def again(self, job: Job, retried: list[CellResult]) -> Job | None:
        """The part of ``job`` to run again (the cells of ``retried``), or None."""
        ids = {r.cell.id for r in retried if r.retry_attempt}
        return job.only(ids, self.attempts) if ids else None

    def kill_grace(self) -> float:
        """Seconds past the limit after which a worker that did not stop at a step is killed."""
        return 0.0 if self.time_limit is None else min(300.0, max(10.0, 0.1 * self.time_limit))


def failed_results(job: Job, error: str, retryable: bool = False) -> list[CellResult]:
    """Every cell of ``job`` failed with ``error`` (its worker or task died, its teacher failed)."""
    return [CellResult.failed(c, a, error, retryable) for c, a in zip(job.cells, job.attempts, strict=True)]


class Executor:
    """Base class of executor plugins.

    ``run`` blocks until every job has its results, reporting each through ``events`` (in
    completion order) after asking ``policy``; ``submit`` (optional) hands the jobs to an outside
    scheduler and returns at once, and ``kdbench run`` later collects what finished from the cell
    directories.
    """

    #: True when ``submit`` is supported (``kdbench run --detach``)
    detachable: bool = False
    #: how often a retryable failure runs again (a plugin parameter where it has one)
    retries: int = 0

    def run(self, jobs: list[Job], events: Events, policy: RetryPolicy) -> None:
        raise NotImplementedError

    def fit(self, cpus: int, threads: int) -> str | None:
        """Fit this executor's parallelism to the ``cpus`` this process may use at ``threads``
        per cell; a line saying what was reduced, or None. (Remote executors: nothing to fit.)"""
        return None

    def chose(self) -> str | None:
        """A line on what ``fit`` chose by itself (``workers: auto``), shown dim; or None."""
        return None

    def slots(self) -> int:
        """How many jobs run at once, after ``fit`` (lockstep groups are cut to keep them busy);
        1 where unknown, which keeps every group whole."""
        return 1

    def submit(self, jobs: list[Job]) -> dict[str, str]:
        """Submit and return {cell id: external job id}; only when ``detachable``."""
        raise NotImplementedError(f"{type(self).__name__} cannot detach; run without --detach")

    def alive(self, external_ids: dict[str, str]) -> dict[str, bool]:
        """Which previously submitted jobs are still queued or running (for --detach/status)."""
        return dict.fromkeys(external_ids, False)

    def describe(self) -> dict[str, Any]:
        """What the store and ``report --details`` record about where cells ran."""
        return {"kind": type(self).__name__}


# ------------------------------------------------------------------- an outside worker


def run_in_worker(job: Job) -> list[CellResult]:
    """What a Slurm task or a Ray task runs: ``job`` in this process, each cell's start recorded
    in ``cells/<id>/worker.json`` (host, pid, attempt: ``kdbench status`` says where it runs; a
    requeued submission counts as the next attempt), a preemption signal turned into a
    checkpoint at the next step."""
    from kdbench.engine import ranks
    from kdbench.engine.run import run_job

    attempts = []
    for c, a in zip(job.cells, job.attempts, strict=True):
        cdir = Path(job.run_dir) / "cells" / c.id
        cdir.mkdir(parents=True, exist_ok=True)
        attempts.append(this_attempt(cdir, a))
        if os.environ.get("RANK", "0") == "0" and ranks.current() is None:  # a DDP cell's rank 0 speaks
            _write_worker(cdir, attempts[-1])
    job = replace(job, attempts=tuple(attempts))
    with _graceful_preemption():
        return run_job(job)


def _write_worker(cdir: Path, attempt: int) -> None:
    write_json_atomic(
        cdir / "worker.json",
        {"host": platform.node(), "pid": os.getpid(), "started": time.time(), "attempt": attempt},
    )


def this_attempt(cdir: Path, submitted: int) -> int:
    """The attempt number of a cell starting now: ``submitted`` (what the driver counted), or one
    more than the start recorded in ``worker.json`` when the scheduler restarted this same
    submission (a Ray retry, a Slurm requeue after preemption or a time-out)."""
    try:
        before = int(json.loads((cdir / "worker.json").read_text()).get("attempt", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return submitted
    return before + 1 if before >= submitted else submitted


class _graceful_preemption:
    """Turn a scheduler's preemption signal into a checkpoint at the next step boundary.

    Slurm (through submitit: USR2, its handler requeues the job) and plain SIGTERM: our handler
    asks the trainer to checkpoint at its next step and raise ``StopRequested``; then the
    handler that was there before runs (submitit's requeue) or, for SIGTERM, the process exits
    143. The requeued cell resumes from that exact step.
    """

    SIGNALS = ("SIGUSR2", "SIGTERM")

    def __enter__(self):
        import signal
        import threading

        self.previous: dict[int, Any] = {}
        self.caught: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        from kdbench.engine.train import request_stop

        self.caught = signum
        request_stop()

    def __exit__(self, exc_type, exc, tb) -> bool:
        import signal

        from kdbench.engine.train import StopRequested

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if exc_type is not None and issubclass(exc_type, StopRequested) and self.caught is not None:
            prev = self.previous.get(self.caught)
            if callable(prev):
                prev(self.caught, None)  # submitit: checkpoint() + requeue + exit
            raise SystemExit(128 + self.caught)
        return False
