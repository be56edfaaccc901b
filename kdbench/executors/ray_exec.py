"""Cells as Ray tasks, on one machine (``address: local``) or a Ray cluster.

Each cell is one task with ``num_cpus`` / ``num_gpus`` resources; a task whose worker dies
(OOM killer, node loss, a segfaulting plugin) is retried by Ray up to ``retries`` times and
resumes from the cell's last epoch checkpoint. Teachers are tasks too: the cells that need a
teacher are submitted with the teacher task's reference as an argument, so Ray starts them
only once it finished (a dependency, not a lock). Workers write only their cell directory and
the teacher cache; the run directory must be on a filesystem every node sees.
"""

from __future__ import annotations

from typing import Any

from kdbench.cells import CellResult, Job
from kdbench.errors import ConfigError
from kdbench.executors.base import Events, Executor, RetryPolicy, failed_results, run_in_worker
from kdbench.executors.submitit_exec import _first_line, run_teacher_job


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("executor `ray` needs the ray package: pip install 'kdbench[ray]'") from None
    return ray


def _cell_after_teacher(job: Job, teacher_id: str | None) -> list[CellResult]:
    return run_in_worker(job)


class RayExecutor(Executor):
    """Run cells as Ray tasks.

    ``address``: ``local`` starts a Ray instance on this machine (``num_cpus`` caps it),
    ``auto`` joins the cluster this machine belongs to, ``ray://host:10001`` a remote one.
    ``cpus_per_cell`` / ``gpus_per_cell`` are each task's resources; ``retries`` how often a
    task whose worker died is retried.
    """

    def __init__(
        self,
        address: str = "local",
        num_cpus: int | None = None,
        cpus_per_cell: float = 1,
        gpus_per_cell: float = 0,
        retries: int = 2,
    ):
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_cell = cpus_per_cell
        self.gpus_per_cell = gpus_per_cell
        self.retries = retries

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "address": self.address}

    def _init(self):
        ray = _ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address == "local":
                if self.num_cpus is not None:
                    kwargs["num_cpus"] = self.num_cpus
            else:
                kwargs["address"] = self.address
            ray.init(**kwargs)
        return ray

    def run(self, jobs: list[Job], events: Events, policy: RetryPolicy) -> None:
        if not jobs:
            return
        policy.track(jobs)
        ray = self._init()
        opts = {"num_cpus": self.cpus_per_cell, "num_gpus": self.gpus_per_cell}
        self._teacher_task = ray.remote(max_retries=self.retries, **opts)(run_teacher_job)
        self._cell_task = ray.remote(max_retries=self.retries, retry_exceptions=False, **opts)(
            _cell_after_teacher
        )
        self._teachers: dict[str, Any] = {}
        refs = {self._submit(j): j for j in jobs}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    got = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - task or its teacher failed for good
                    got = failed_results(job, f"ray task: {_first_line(_cause(e))}")
                told = [policy.check(r) for r in got]
                for r in told:
                    events.result(r)
                again = policy.again(job, told)  # a time limit reached: from its checkpoint
                if again is not None:
                    refs[self._submit(again)] = again

    def _submit(self, job: Job) -> Any:
        """A cell task, after the task of its teacher (one per teacher)."""
        c, dep = job.first, None
        if c.uses_teacher:
            if c.teacher.id not in self._teachers:
                self._teachers[c.teacher.id] = self._teacher_task.remote(c, job.run_dir, job.threads)
            dep = self._teachers[c.teacher.id]
        return self._cell_task.remote(job, dep)

    def shutdown(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            ray.shutdown()


def _cause(e: BaseException) -> BaseException:
    """The user-level error inside a Ray task error (teacher failures surface through the cell)."""
    inner = getattr(e, "cause", None)
    return inner if isinstance(inner, BaseException) else e
