"""The engine's entry: run one job (a cell, or a lockstep group of cells) in this process.

Every executor ends here, inline or in a worker. A DDP cell (``gpus_per_cell`` x ``nodes`` > 1)
is handed to the DDP launcher; every other single cell runs in this process and never enters
the distributed code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kdbench.cells import Cell, CellResult, Job
from kdbench.engine import ranks
from kdbench.engine.train import Progress, time_limit

#: a cell's per-epoch progress callback (None: no progress)
ProgressFor = Callable[[Cell], Progress | None]


def run_job(
    job: Job,
    progress: ProgressFor | None = None,
    on_result: Callable[[CellResult], None] | None = None,
) -> list[CellResult]:
    """Run ``job`` here with its threads and time limit; the results of its cells (each also
    given to ``on_result`` as it comes: a group's cells may finish in any order)."""
    torch.set_num_threads(max(1, job.threads))
    run_dir = Path(job.run_dir)
    if len(job.cells) > 1:
        from kdbench.engine.lockstep import run_group

        attempts = dict(zip(job.ids, job.attempts, strict=True))
        with time_limit(job.time_limit):
            return run_group(job.cells, run_dir, progress, attempts, on_result, loggers=job.loggers)
    cell, attempt = job.first, job.attempts[0]
    mine = progress(cell) if progress is not None else None
    if ranks.world_size(cell.train) > 1 and ranks.current() is None:
        from kdbench.engine.distributed import launch_cell  # N rank processes (or this one's rank)

        result = launch_cell(cell, run_dir, mine, attempt, job.loggers)
    else:
        from kdbench.engine.cell import run_cell

        result = run_cell(cell, run_dir, mine, attempt, job.time_limit, job.loggers)
    if result is None:  # a rank other than 0 of an outside launcher: rank 0 speaks for the cell
        return []
    if on_result is not None:
        on_result(result)
    return [result]
