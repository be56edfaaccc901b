"""Slurm through submitit: one job array per sweep, requeued on preemption and time-out.

Each cell is one array task running :func:`kdbench.executors.base.run_cell_job`. The task is
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

from kdbench.errors import ConfigError
from kdbench.executors.base import CellJob, Executor, OnResult, failed_results, run_cell_job, run_job


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "executor `submitit` needs the submitit package: pip install 'kdbench[slurm]'"
        ) from None
    return submitit


def run_teacher_job(cell: dict[str, Any], run_dir: str, threads: int) -> str:
    """Obtain (train or load) and cache the teacher ``cell`` needs; returns its id."""
    import torch

    torch.set_num_threads(max(1, threads))
    from kdbench.engine.cell import prepare_teacher

    try:
        from kdbench.cells import Cell

        typed: Any = Cell.from_dict(cell)
    except ImportError:
        typed = cell
    prepare_teacher(typed, Path(run_dir))
    return cell["teacher"]["id"]


def ranks_of(cell: dict[str, Any]) -> tuple[int, int]:
    """(ranks per node, nodes) of a cell: ``train.gpus_per_cell`` and ``train.nodes`` (DDP)."""
    tr = cell.get("train") or {}
    return int(tr.get("gpus_per_cell") or 1), int(tr.get("nodes") or 1)


class _CellTask:
    """The callable submitit pickles for each array task (requeued as is on preemption).

    A DDP cell (``train.gpus_per_cell`` > 1) runs as ``tasks_per_node`` tasks: each exports
    the torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR...) and the engine runs
    it as that rank; task 0's result is the cell's.
    """

    def __call__(self, job: CellJob) -> dict[str, Any] | list[dict[str, Any]]:
        if job.group:  # a lockstep group sharing its teacher (never DDP): its cells' results
            return run_job(job)
        per_node, nodes = ranks_of(job.cell)
        if per_node * nodes > 1:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
        return run_cell_job(job)

    def checkpoint(self, job: CellJob):  # submitit calls this on preemption / time-out
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
        self, run_dir: str, name: str, dependency: str | None = None, ranks: tuple[int, int] = (1, 1)
    ):
        submitit = _submitit()
        folder = Path(self.folder) if self.folder else Path(run_dir) / "submitit"
        cluster = None if self.cluster == "auto" else self.cluster
        ex = submitit.AutoExecutor(
            folder=folder / "%j", cluster=cluster, slurm_max_num_timeout=self.max_requeues
        )
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": self.time_min,
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
        if extra:
            params["slurm_additional_parameters"] = extra
        ex.update_parameters(**params)
        return ex

    def _teachers_needed(self, jobs: list[CellJob]) -> dict[str, CellJob]:
        need: dict[str, CellJob] = {}
        for j in jobs:
            t = j.cell.get("teacher") or {}
            if j.cell.get("uses_teacher") and t.get("id") and t["id"] not in need:
                if not (Path(j.run_dir) / "teachers" / f"{t['id']}.pt").exists():
                    need[t["id"]] = j
        return need

    def _submit_teachers(self, jobs: list[CellJob]) -> dict[str, Any]:
        need = self._teachers_needed(jobs)
        if not need:
            return {}
        run_dir = next(iter(need.values())).run_dir
        ex = self._executor(run_dir, "kdbench-teacher")
        with ex.batch():
            handles = [ex.submit(run_teacher_job, j.cell, j.run_dir, j.threads) for j in need.values()]
        return dict(zip(need, handles, strict=False))

    def _submit_cells(self, jobs: list[CellJob], dependency: str | None) -> list[Any]:
        """One job array per rank layout (plain cells: one array), handles in ``jobs`` order."""
        by_ranks: dict[tuple[int, int], list[int]] = {}
        for i, j in enumerate(jobs):
            by_ranks.setdefault(ranks_of(j.cell), []).append(i)
        handles: list[Any] = [None] * len(jobs)
        for ranks, idx in by_ranks.items():
            ex = self._executor(jobs[0].run_dir, "kdbench-cell", dependency, ranks)
            for i, h in zip(idx, ex.map_array(_CellTask(), [jobs[i] for i in idx]), strict=True):
                handles[i] = h
        return handles

    def run(self, jobs: list[CellJob], on_result: OnResult) -> None:
        if not jobs:
            return
        teachers = self._submit_teachers(jobs)
        teacher_error: dict[str, str] = {}
        on_slurm = teachers and type(next(iter(teachers.values()))).__name__ == "SlurmJob"
        if teachers and not on_slurm:  # the local cluster has no dependencies: wait here
            for tid, h in teachers.items():
                try:
                    h.result()
                except Exception as e:  # noqa: BLE001 - the teacher job's own error, passed on
                    teacher_error[tid] = _first_line(e)
        runnable = [j for j in jobs if (j.cell.get("teacher") or {}).get("id") not in teacher_error]
        for j in jobs:
            tid = (j.cell.get("teacher") or {}).get("id")
            if j.cell.get("uses_teacher") and tid in teacher_error:
                for r in failed_results(j, f"teacher {tid} failed: {teacher_error[tid]}"):
                    on_result(r)
        if not runnable:
            return
        dependency = None
        if on_slurm:
            dependency = "afterok:" + ":".join(h.job_id for h in teachers.values())
        handles = self._submit_cells(runnable, dependency)
        pending = dict(zip(handles, runnable, strict=False))
        while pending:
            for h in [h for h in pending if h.done()]:
                job = pending.pop(h)
                try:
                    got = h.results()[0]  # a DDP cell's tasks: rank 0 speaks for the cell
                except Exception as e:  # noqa: BLE001 - a dead or cancelled task is a failed cell
                    got = failed_results(job, f"submitit job {h.job_id}: {_first_line(e)}")
                for r in got if isinstance(got, list) else [got]:
                    on_result(r)
            if pending:
                time.sleep(self.poll_s)

    def submit(self, jobs: list[CellJob]) -> dict[str, str]:
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
