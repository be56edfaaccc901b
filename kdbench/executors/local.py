"""The default executor: jobs inline in the driver (one worker), or on N local worker processes.

``workers: auto`` (the default) runs as many workers as the CPUs this process may use allow at
``executor.threads`` each; ``--workers 1`` runs inline. The pool (kdbench/executors/pool.py) spawns
workers that die with the driver; a hard worker death fails only its cells.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

from kdbench.cells import Job
from kdbench.errors import ConfigError
from kdbench.executors.base import Events, Executor, RetryPolicy


class LocalExecutor(Executor):
    """``workers`` processes on this machine (1: inline; "auto": what the CPUs allow); ``gpus``
    pins worker i to gpus[i % len]; ``retries``: how often a cell whose worker died or that hit
    ``executor.time_limit`` runs again (from its checkpoint)."""

    def __init__(self, workers: int | Literal["auto"] = 1, gpus: list[int] | None = None, retries: int = 0):
        if workers != "auto" and (not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"executor.workers must be at least 1 or 'auto', got {workers!r}")
        if retries < 0:
            raise ConfigError(f"executor.retries must be 0 or more, got {retries}")
        self.workers = workers
        self.gpus = list(gpus) if gpus else None
        self.retries = retries

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "workers": self.workers, "gpus": self.gpus, "retries": self.retries}

    def fit(self, cpus: int, threads: int) -> str | None:
        fit = max(1, cpus // threads)
        if self.workers == "auto":
            self.workers = fit
            return None
        if self.workers * threads <= cpus:
            return None
        asked, self.workers = self.workers, fit
        return (
            f"{asked} workers x {threads} thread(s) would oversubscribe the {cpus} CPU(s) this process "
            f"may use; running {fit} worker(s)"
        )

    def run(self, jobs: list[Job], events: Events, policy: RetryPolicy) -> None:
        policy.track(jobs)
        n = 1 if self.workers == "auto" else self.workers
        if n == 1 or len(jobs) <= 1:
            _run_inline(jobs, events, policy)
            return
        from kdbench.executors.pool import run_pool

        run_pool(jobs, n, events, policy, self.gpus)


def _run_inline(jobs: list[Job], events: Events, policy: RetryPolicy) -> None:
    """One job after the other in this process; a job to retry goes to the back of the queue."""
    from kdbench.engine.run import run_job

    queue = deque(jobs)
    while queue:
        job = queue.popleft()
        told = []

        def on_result(r, told=told) -> None:
            r = policy.check(r)
            told.append(r)
            events.result(r)

        run_job(job, events.progress_for, on_result)
        again = policy.again(job, told)
        if again is not None:
            queue.append(again)
