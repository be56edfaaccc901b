"""Slurm through submitit: one job array per sweep, requeued on preemption and time-out.

Each job is one array task running :func:`kdbench.executors.base.run_in_worker`. The task is
a ``submitit.helpers.Checkpointable``: when Slurm (or submitit's local cluster) signals a
preemption or an imminent time-out, submitit requeues the same call, and the cell resumes
from its last epoch checkpoint (the engine writes one every ``checkpoint_every`` epochs).

Teachers are dependencies, not locks: every teacher the cells need and the cache lacks is
trained by one job first; on Slurm the cells' array waits for it with ``--dependency=afterok``,
on the local cluster the driver waits for it before submitting the cells. A failed teacher
fails its cells with the teacher's reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from kdbench.cells import Cell, CellResult, Job
from kdbench.errors import ConfigError
from kdbench.executors.base import Events, Executor, RetryPolicy, failed_results, run_in_worker


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "executor `submitit` needs the submitit package: pip install 'kdbench[slurm]'"
        ) from None
    return submitit


def run_teacher_job(cell: Cell, run_dir: str, threads: int) -> str:
    """Obtain (train or load) and cache the teacher ``cell`` needs; returns its id."""
    import torch

    torch.set_num_threads(max(1, threads))
    from kdbench.engine.cell import prepare_teacher

    prepare_teacher(cell, Path(run_dir))
    return cell.teacher.id


def ranks_of(cell: Cell) -> tuple[int, int]:
    """(ranks per node, nodes) of a cell: ``train.gpus_per_cell`` and ``train.nodes`` (DDP)."""
    return int(cell.train.gpus_per_cell or 1), int(cell.train.nodes or 1)


class _CellTask:
    """The callable submitit pickles for each array task (requeued as is on preemption).

    A DDP cell (``train.gpus_per_cell`` > 1) runs as ``tasks_per_node`` tasks: each exports
    the torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR...) and the engine runs
    it as that rank; task 0's results are the cell's.
    """

    def __call__(self, job: Job) -> list[CellResult]:
        per_node, nodes = ranks_of(job.first)
        if len(job.cells) == 1 and per_node * nodes > 1:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
        return run_in_worker(job)

    def checkpoint(self, job: Job):  # submitit calls this on preemption / time-out
        import submitit

        return submitit.helpers.DelayedSubmission(self, job)


class SubmititExecutor(Executor):
    """Cells as a Slurm job array (``cluster: slurm``) or on submitit's local cluster (``local``).

    Parameters map to submitit's AutoExecutor: ``partition``, ``time_min`` (per cell),
    ``gpus_per_cell``, ``cpus_per_cell``, ``mem_gb``, ``array_parallelism``
    (``slurm_array_parallelism``), ``sbatch`` (extra sbatch options, passed through as
    ``slurm_additional_parameters``), ``max_requeues`` (preemptions / time-outs tolerated per cell).
    ``folder`` holds submitit's job files (default ``<run dir>/submitit``).
    """

    detachable = True

    def __init__(
        self,
        cluster: Literal["auto", "slurm", "local", "debug"] = "auto",
        folder: str | None = None,
        partition: str | None = None,
        time_min: int = 60,
        gpus_per_cell: int = 0,
        cpus_per_cell: int = 1,
        mem_gb: float | None = None,
        array_parallelism: int = 256,
        sbatch: dict[str, Any] | None = None,
        max_requeues: int = 3,
        poll_s: float = 1.0,
    ):
        self.cluster = cluster
        self.folder = folder
        self.partition = partition
        self.time_min = time_min
        self.gpus_per_cell = gpus_per_cell
        self.cpus_per_cell = cpus_per_cell
        self.mem_gb = mem_gb
        self.array_parallelism = array_parallelism
        self.sbatch = dict(sbatch or {})
        self.max_requeues = max_requeues
        self.poll_s = poll_s

    def describe(self) -> dict[str, Any]:
        return {"kind": "submitit", "cluster": self.cluster, "partition": self.partition}

    def _executor(
        self,
        run_dir: str,
        name: str,
        dependency: str | None = None,
        ranks: tuple[int, int] = (1, 1),
        cells: int = 1,
    ):
        submitit = _submitit()
        folder = Path(self.folder) if self.folder else Path(run_dir) / "submitit"
        cluster = None if self.cluster == "auto" else self.cluster
        ex = submitit.AutoExecutor(
            folder=folder / "%j", cluster=cluster, slurm_max_num_timeout=self.max_requeues
        )
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": self.time_min * cells,  # a lockstep group runs its cells' steps in turn
            "cpus_per_task": self.cpus_per_cell,
            # a DDP cell: one task (and with GPUs one GPU) per rank; else the executor's resources
            "gpus_per_node": ranks[0] if ranks[0] > 1 and self.gpus_per_cell else self.gpus_per_cell,
            "tasks_per_node": ranks[0],
            "nodes": ranks[1],
            "slurm_array_parallelism": self.array_parallelism,
        }
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        extra = dict(self.sbatch)
        if dependency:
            extra["dependency"] = dependency
            # a failed teacher: Slurm cancels the dependants instead of leaving them pending
            extra.setdefault("kill_on_invalid_dep", "yes")
        if extra:
            params["slurm_additional_parameters"] = extra
        ex.update_parameters(**params)
        return ex

    def _teachers_needed(self, jobs: list[Job]) -> dict[str, Job]:
        need: dict[str, Job] = {}
        for j in jobs:
            c = j.first
            if c.uses_teacher and c.teacher.id not in need:
                if not (Path(j.run_dir) / "teachers" / f"{c.teacher.id}.pt").exists():
                    need[c.teacher.id] = j
        return need

    def _submit_teachers(self, jobs: list[Job]) -> dict[str, Any]:
        need = self._teachers_needed(jobs)
        if not need:
            return {}
        run_dir = next(iter(need.values())).run_dir
        ex = self._executor(run_dir, "kdbench-teacher")
        with ex.batch():
            handles = [ex.submit(run_teacher_job, j.first, j.run_dir, j.threads) for j in need.values()]
        return dict(zip(need, handles, strict=False))

    def _submit_cells(self, jobs: list[Job], dependency: str | None) -> list[Any]:
        """One job array per (rank layout, group size), handles in ``jobs`` order."""
        by_shape: dict[tuple[tuple[int, int], int], list[int]] = {}
        for i, j in enumerate(jobs):
            by_shape.setdefault((ranks_of(j.first), len(j.cells)), []).append(i)
        handles: list[Any] = [None] * len(jobs)
        for (ranks, n), idx in by_shape.items():
            ex = self._executor(jobs[0].run_dir, "kdbench-cell", dependency, ranks, n)
            for i, h in zip(idx, ex.map_array(_CellTask(), [jobs[i] for i in idx]), strict=True):
                handles[i] = h
        return handles

    def run(self, jobs: list[Job], events: Events, policy: RetryPolicy) -> None:
        policy.track(jobs)
        queue = list(jobs)
        while queue:
            queue = self._run_once(queue, events, policy)

    def _run_once(self, jobs: list[Job], events: Events, policy: RetryPolicy) -> list[Job]:
        """Submit ``jobs`` after their teachers, report results as they finish; the jobs to retry."""
        teachers = self._submit_teachers(jobs)
        on_slurm = bool(teachers) and type(next(iter(teachers.values()))).__name__ == "SlurmJob"
        failed = {} if on_slurm else _wait_teachers(teachers)  # the local cluster has no dependencies
        runnable = [j for j in jobs if not _teacher_failed(j, failed, events)]
        dependency = "afterok:" + ":".join(h.job_id for h in teachers.values()) if on_slurm else None
        handles = self._submit_cells(runnable, dependency) if runnable else []
        pending = dict(zip(handles, runnable, strict=False))
        again: list[Job] = []
        while pending:
            if on_slurm:  # a teacher that failed: cancel its dependants and fail their cells
                _cancel_orphans(teachers, pending, events)
            for h in [h for h in pending if h.done()]:
                job = pending.pop(h)
                try:
                    got = h.results()[0]  # a DDP cell's tasks: rank 0 speaks for the cell
                except Exception as e:  # noqa: BLE001 - a dead or cancelled task is a failed cell
                    got = failed_results(job, f"submitit job {h.job_id}: {_first_line(e)}")
                told = [policy.check(r) for r in got]
                for r in told:
                    events.result(r)
                retry = policy.again(job, told)
                if retry is not None:
                    again.append(retry)
            if pending:
                time.sleep(self.poll_s)
        return again

    def submit(self, jobs: list[Job]) -> dict[str, str]:
        if not jobs:
            return {}
        teachers = self._submit_teachers(jobs)
        dependency = None
        if teachers:
            dependency = "afterok:" + ":".join(h.job_id for h in teachers.values())
            if type(next(iter(teachers.values()))).__name__ != "SlurmJob":
                for h in teachers.values():
                    h.result()  # the local cluster cannot express the dependency: wait
                dependency = None
        handles = self._submit_cells(jobs, dependency)
        return {cid: h.job_id for j, h in zip(jobs, handles, strict=False) for cid in j.ids}

    def alive(self, external_ids: dict[str, str]) -> dict[str, bool]:
        if self.cluster in ("local", "debug"):  # job id = the local controller's PID on this host
            return {cid: _pid_alive(jid) for cid, jid in external_ids.items()}
        submitit = _submitit()
        out = {}
        for cid, jid in external_ids.items():
            try:
                state = submitit.SlurmJob(folder=".", job_id=jid).state
                out[cid] = state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED")
            except Exception:  # noqa: BLE001 - no Slurm here: nothing of ours is queued
                out[cid] = False
        return out


def _wait_teachers(teachers: dict[str, Any]) -> dict[str, str]:
    """Wait for every teacher job; teacher id -> the error of those that failed."""
    failed = {}
    for tid, h in teachers.items():
        try:
            h.result()
        except Exception as e:  # noqa: BLE001 - the teacher job's own error, passed on
            failed[tid] = _first_line(e)
    return failed


def _teacher_failed(job: Job, failed: dict[str, str], events: Events) -> bool:
    """Fail ``job``'s cells when its teacher failed; whether it did."""
    tid = job.first.teacher.id
    if not job.first.uses_teacher or tid not in failed:
        return False
    for r in failed_results(job, f"teacher {tid} failed: {failed[tid]}"):
        events.result(r)
    return True


def _cancel_orphans(teachers: dict[str, Any], pending: dict[Any, Job], events: Events) -> None:
    """On Slurm: the cells waiting (``afterok``) on a teacher job that failed would wait forever;
    cancel them and fail their cells with the teacher's error."""
    for tid, th in teachers.items():
        if not th.done() or th.state in ("COMPLETED", "FINISHED"):
            continue
        try:
            th.result()
            continue
        except Exception as e:  # noqa: BLE001 - the teacher's error, passed on to its cells
            why = _first_line(e)
        for h, job in list(pending.items()):
            if job.first.uses_teacher and job.first.teacher.id == tid:
                h.cancel(check=False)
                del pending[h]
                for r in failed_results(job, f"teacher {tid} failed: {why}"):
                    events.result(r)


def _pid_alive(jid: str) -> bool:
    import os

    try:
        os.kill(int(jid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln.strip()]
    return f"{type(e).__name__}: {tail[-1] if tail else ''}"
