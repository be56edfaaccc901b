"""The executor interface and the function every worker runs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: called by an executor (in the driver process) with each finished cell's result dict
OnResult = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class CellJob:
    """One cell to run: its resolved config (JSON-able dict), where, which attempt, how many threads."""

    cell: dict[str, Any]
    run_dir: str
    attempt: int = 1
    threads: int = 1
    #: seconds of wall time per attempt (``executor.time_limit``), None: none
    time_limit: float | None = None
    #: more cells that run in lockstep with ``cell``, sharing its teacher's forward
    #: (``executor.share_teacher``), and their attempt numbers
    group: tuple[dict[str, Any], ...] = ()
    group_attempts: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        return self.cell["id"]

    @property
    def cells(self) -> list[dict[str, Any]]:
        """Every cell this job runs: ``cell``, then the rest of its group."""
        return [self.cell, *self.group]

    @property
    def ids(self) -> list[str]:
        return [c["id"] for c in self.cells]

    @property
    def attempts(self) -> tuple[int, ...]:
        """The attempt numbers of :attr:`cells`, in order."""
        return (self.attempt, *self.group_attempts)


class Executor:
    """Base class of executor plugins.

    ``run`` blocks until every job has a result and calls ``on_result`` in the driver for each
    (in completion order). ``submit`` (optional) hands the jobs to an outside scheduler and
    returns at once; ``kdbench run`` later collects what finished from the cell directories.
    """

    #: True when ``submit`` is supported (``kdbench run --detach``)
    detachable: bool = False

    def run(self, jobs: list[CellJob], on_result: OnResult) -> None:
        raise NotImplementedError

    def submit(self, jobs: list[CellJob]) -> dict[str, str]:
        """Submit and return {cell id: external job id}; only when ``detachable``."""
        raise NotImplementedError(f"{type(self).__name__} cannot detach; run without --detach")

    def alive(self, external_ids: dict[str, str]) -> dict[str, bool]:
        """Which previously submitted jobs are still queued or running (for --detach/status)."""
        return {k: False for k in external_ids}

    def describe(self) -> dict[str, Any]:
        """What the store and ``report --details`` record about where cells ran."""
        return {"kind": type(self).__name__}


def failed_result(job: CellJob, error: str) -> dict[str, Any]:
    """The result of a cell whose worker died before it could write one."""
    return {"cell": job.cell, "status": "failed", "error": error, "attempt": job.attempt}


def failed_results(job: CellJob, error: str) -> list[dict[str, Any]]:
    """:func:`failed_result` for every cell of ``job`` (one cell or a lockstep group)."""
    return [
        {"cell": c, "status": "failed", "error": error, "attempt": a}
        for c, a in zip(job.cells, job.attempts, strict=True)
    ]


def run_job(job: CellJob) -> list[dict[str, Any]]:
    """Run ``job`` in this process: one cell (:func:`run_cell_job`) or a lockstep group; the
    results of every cell it holds."""
    if not job.group:
        return [run_cell_job(job)]
    import torch

    from kdbench.cells import Cell
    from kdbench.engine.lockstep import run_group
    from kdbench.engine.train import time_limit

    torch.set_num_threads(max(1, job.threads))
    attempts = {}
    for c, a in zip(job.cells, job.attempts, strict=True):
        cdir = Path(job.run_dir) / "cells" / c["id"]
        cdir.mkdir(parents=True, exist_ok=True)
        attempts[c["id"]] = this_attempt(cdir, a)
        _write_worker(cdir, attempts[c["id"]])
    with _graceful_preemption(), time_limit(job.time_limit):
        results = run_group([Cell.from_dict(c) for c in job.cells], Path(job.run_dir), None, attempts)
    return [_jsonable(r) for r in results]


def _write_worker(cdir: Path, attempt: int) -> None:
    import platform

    from kdbench.store import write_json_atomic

    write_json_atomic(
        cdir / "worker.json",
        {"host": platform.node(), "pid": os.getpid(), "started": time.time(), "attempt": attempt},
    )


def run_cell_job(job: CellJob) -> dict[str, Any]:
    """Run one cell in this process (what every worker does) and return its result dict.

    Sets the cell's intra-op thread count first, so a cell's numbers do not depend on where
    it was scheduled. Writes ``cells/<id>/worker.json`` (host, pid, start time) so
    ``kdbench status`` can say where a cell is running.
    """

    import torch

    torch.set_num_threads(max(1, job.threads))
    cdir = Path(job.run_dir) / "cells" / job.id
    cdir.mkdir(parents=True, exist_ok=True)
    attempt = this_attempt(cdir, job.attempt)
    if os.environ.get("RANK", "0") == "0":  # a DDP cell's rank 0 speaks for it
        _write_worker(cdir, attempt)
    from kdbench.engine.cell import run_cell

    cell: Any = job.cell
    try:  # typed cells where the engine takes them
        from kdbench.cells import Cell

        cell = Cell.from_dict(job.cell)
    except ImportError:
        pass
    with _graceful_preemption():
        result = run_cell(cell, Path(job.run_dir), None, attempt, job.time_limit)
    return _jsonable(result)


def this_attempt(cdir: Path, submitted: int) -> int:
    """The attempt number of a cell starting now: ``submitted`` (what the driver counted), or one
    more than the start recorded in ``worker.json`` when the scheduler restarted this same
    submission (a Ray retry, a Slurm requeue after preemption or a time-out)."""
    import json

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


def _jsonable(result: Any) -> dict[str, Any]:
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    out = dict(result)
    if hasattr(out.get("cell"), "model_dump"):
        out["cell"] = out["cell"].model_dump(mode="json")
    return out
