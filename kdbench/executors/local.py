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
    """``workers`` processes on this machine (1: inline); ``gpus`` pins worker i to gpus[i % len]."""

    def __init__(self, workers: int = 1, gpus: list[int] | None = None):
        if workers < 1:
            raise ConfigError(f"executor.workers must be at least 1, got {workers}")
        self.workers = workers
        self.gpus = list(gpus) if gpus else None

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "workers": self.workers, "gpus": self.gpus}

    def run(self, jobs: list[CellJob], on_result: OnResult) -> None:
        """Run ``jobs`` without the driver's progress display (used by tests and other tools)."""
        from pathlib import Path

        from kdbench.executors.base import run_cell_job
        from kdbench.pool import run_pool

        if not jobs:
            return
        if self.workers == 1 or len(jobs) == 1:
            for j in jobs:
                on_result(run_cell_job(j))
            return
        cells = [j.cell for j in jobs]
        try:
            from kdbench.cells import Cell

            cells = [Cell.from_dict(c) for c in cells]
        except ImportError:
            pass
        attempts = {j.id: j.attempt for j in jobs}
        run_pool(
            cells, Path(jobs[0].run_dir), self.workers, jobs[0].threads, attempts, on_result, None, self.gpus
        )
