"""The default executor: cells inline in the driver, or on N local worker processes.

The driver runs it through :func:`kdbench.pool.run_pool` (spawned workers that die with the
driver, a hard worker death failing only its cell) or inline with live progress lines; this
class carries and validates the grid's parameters like any executor plugin.
"""

from __future__ import annotations

from typing import Any

from kdbench.errors import ConfigError
from kdbench.executors.base import CellJob, Executor, OnResult


class LocalExecutor(Executor):
    """``workers`` processes on this machine (1: inline); ``gpus`` pins worker i to gpus[i % len];
    ``retries``: how often a cell whose worker died or that hit ``executor.time_limit`` runs again
    (from its checkpoint; a NaN loss or a config error is not retried)."""

    def __init__(self, workers: int = 1, gpus: list[int] | None = None, retries: int = 0):
        if workers < 1:
            raise ConfigError(f"executor.workers must be at least 1, got {workers}")
        if retries < 0:
            raise ConfigError(f"executor.retries must be 0 or more, got {retries}")
        self.workers = workers
        self.gpus = list(gpus) if gpus else None
        self.retries = retries

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "workers": self.workers, "gpus": self.gpus, "retries": self.retries}

    def run(self, jobs: list[CellJob], on_result: OnResult) -> None:
        """Run ``jobs`` without the driver's progress display (used by tests and other tools)."""
        from pathlib import Path

        from kdbench.cells import Cell
        from kdbench.executors.base import CellJob, run_job
        from kdbench.pool import retry_if_allowed, run_pool

        if not jobs:
            return
        attempts = {cid: a for j in jobs for cid, a in zip(j.ids, j.attempts, strict=True)}
        if self.workers == 1 or len(jobs) == 1:
            first = dict(attempts)
            queue = list(jobs)
            while queue:
                j = queue.pop(0)
                for result in run_job(j):
                    if retry_if_allowed(result, attempts, first, self.retries):  # alone, from its checkpoint
                        c = result["cell"]
                        queue.append(CellJob(c, j.run_dir, attempts[c["id"]], j.threads, j.time_limit))
                    on_result(result)
            return
        cells: list = [
            [Cell.from_dict(c) for c in j.cells] if j.group else Cell.from_dict(j.cell) for j in jobs
        ]
        j = jobs[0]
        run_pool(
            cells,
            Path(j.run_dir),
            self.workers,
            j.threads,
            attempts,
            on_result,
            None,
            self.gpus,
            j.time_limit,
            self.retries,
        )
