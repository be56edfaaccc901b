"""The default executor: jobs inline in the driver (one worker), or on N local worker processes.

``workers: auto`` (the default) uses the machine: one worker per visible GPU on a GPU machine,
else the CPUs this process may use divided by ``executor.threads``, capped by the memory
available (:data:`WORKER_GIB` per worker). Each cell's intra-op threads stay fixed, so the numbers
are bitwise those of an inline run. ``--workers 1`` runs inline. The pool
(kdbench/executors/pool.py) spawns workers that die with the driver; a hard worker death fails
only its cells.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

from kdbench.cells import Job
from kdbench.errors import ConfigError
from kdbench.executors.base import Events, Executor, RetryPolicy

#: memory one worker is expected to need at its peak: a torch process with its copy of an
#: in-memory dataset and CIFAR-size models. Measured (peak RSS, `/usr/bin/time -v`, one inline
#: process holding the driver too, 1 epoch, batch 64, MNIST-5k): smallcnn_wide -> smallcnn_thin
#: kd 1.16 GiB; resnet56 -> resnet20 kd, teacher trained in the same process, 1.80 GiB.
WORKER_GIB = 2.0


def available_gib(meminfo: str = "/proc/meminfo") -> float | None:
    """GiB of memory available to new processes (``MemAvailable``), or None when unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return 0


class LocalExecutor(Executor):
    """``workers`` processes on this machine (1: inline; "auto": what the CPUs allow); ``gpus``
    pins worker i to gpus[i % len]; ``retries``: how often a cell whose worker died or that hit
    ``executor.time_limit`` runs again (from its checkpoint)."""

    def __init__(
        self, workers: int | Literal["auto"] = "auto", gpus: list[int] | None = None, retries: int = 0
    ):
        if workers != "auto" and (not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"executor.workers must be at least 1 or 'auto', got {workers!r}")
        if retries < 0:
            raise ConfigError(f"executor.retries must be 0 or more, got {retries}")
        self.workers = workers
        self.gpus = list(gpus) if gpus else None
        self.retries = retries
        self._chose: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "workers": self.workers, "gpus": self.gpus, "retries": self.retries}

    def fit(self, cpus: int, threads: int) -> str | None:
        fit = max(1, cpus // threads)
        if self.workers == "auto":
            self.workers, why = self._auto(fit, cpus, threads)
            self._chose = f"executor.workers auto: {self.workers} worker(s) ({why}); --workers 1 runs inline"
            return None
        if self.workers * threads <= cpus:
            return None
        asked, self.workers = self.workers, fit
        return (
            f"{asked} workers x {threads} thread(s) would oversubscribe the {cpus} CPU(s) this "
            f"process may use; running {fit} worker(s)"
        )

    def _auto(self, fit: int, cpus: int, threads: int) -> tuple[int, str]:
        """Workers for ``workers: auto`` and the reason, in words."""
        gpus = len(self.gpus) if self.gpus else visible_gpus()
        if gpus:
            return gpus, f"one per visible GPU, {gpus} GPU(s)"
        why = f"{cpus} CPU(s) / {threads} thread(s) per cell"
        gib = available_gib()
        by_memory = int(gib // WORKER_GIB) if gib is not None else fit
        if by_memory < fit:
            return max(
                1, by_memory
            ), f"{why}, capped by {gib:.1f} GiB available at {WORKER_GIB} GiB per worker"
        return fit, why if gib is None else f"{why}; {gib:.0f} GiB available"

    def chose(self) -> str | None:
        return self._chose

    def slots(self) -> int:
        return 1 if self.workers == "auto" else self.workers

    def run(self, jobs: list[Job], events: Events, policy: RetryPolicy) -> None:
        policy.track(jobs)
        n = self.slots()
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
