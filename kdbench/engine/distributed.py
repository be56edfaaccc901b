"""DDP inside one cell: ``train: {gpus_per_cell: N, nodes: 1}`` trains a cell with N processes.

Two ways in:

* **Local launcher** (every executor that calls ``run_cell``): :func:`launch_cell` obtains the
  teacher in the calling process, spawns N rank processes (``spawn`` start method, gloo on CPU,
  nccl on GPU with rank r on ``cuda:r``), forwards rank 0's progress rows, forwards SIGTERM
  (:func:`~kdbench.engine.train.request_stop`) to the ranks and returns rank 0's result.
* **Outside launcher** (Slurm ``tasks_per_node=N`` through submitit, or ``torchrun``): the
  environment has ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
  (``submitit.helpers.TorchDistributedEnvironment().export()`` sets them); ``run_cell`` then
  runs this process as that rank.

What a rank does differently (everything else is the single-process engine):

* Data: every rank draws the SAME epoch order from the cell's seeded generator; ``batch_size``
  is the global batch and rank r takes ``batch[r::N]`` of every global batch (= ``order[r::N]``
  in batches of ``batch_size / N``). A last global batch smaller than ``2 N`` is dropped (each
  rank needs two samples for BatchNorm); otherwise every sample is seen exactly once per epoch.
* Gradients: after ``backward`` the gradients of the optimised parameters are averaged over the
  ranks in one flat all-reduce (DDP's arithmetic: the mean of the ranks' mean-loss gradients).
  This is done by the engine rather than by wrapping the student in ``DistributedDataParallel``
  because a KD step reads the student several times (views), trains method parts that some
  stages leave unused, and taps features with hooks, which DDP's reducer does not accept
  without ``find_unused_parameters``/``static_graph`` caveats. It does not overlap the
  reduction with the backward pass (DDP's buckets do); see the report of issue 11.
* ``sync_bn: true``: BatchNorm layers of the student and the method become
  ``torch.nn.SyncBatchNorm`` on GPU, :class:`CpuSyncBatchNorm` on CPU (torch's needs a GPU).
* Writes: only rank 0 writes (``metrics.jsonl``, ``checkpoint.pt``, ``log.txt``,
  ``result.json``, ``student.pt``); every rank loads the checkpoint on resume; each rank's RNG
  states (augmentation, torch) are gathered into rank 0's checkpoint so a resumed run continues
  exactly. Evaluation runs on rank 0 only.
* Stops: the stop flag rides along in the gradient all-reduce, so every rank stops before the
  same step (a rank stopping alone would leave the others waiting in a collective).

Refused under DDP (a clear error in the cell's result): methods keeping per-sample state
(CRD's memory bank: each rank would update only its shard) and dataset-level augmenters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdbench.cells import Cell, CellResult, PluginKey
from kdbench.engine import ranks
from kdbench.engine.ranks import RankInfo
from kdbench.errors import ConfigError

#: exit code of a rank that stopped on request (its checkpoint saved by rank 0)
STOP_EXIT = 143
#: seconds the launcher waits for the other ranks after one died before killing them
GRACE_S = 20.0
#: offset between the ranks' augmentation / torch RNG seeds (rank 0 keeps the cell's)
RANK_SEED = 1_000_033


_SYNC: DistributedSync | None = None


def describe() -> dict[str, Any]:
    """``{"ddp": {world, backend, device}}`` of this rank (the runtime side of :mod:`ranks`)."""
    info = ranks.current()
    backend = dist.get_backend() if dist.is_initialized() else None
    return {"ddp": {"world": info.world, "backend": backend, "device": info.device.type}}


# ------------------------------------------------------------------------------- rank side


@contextlib.contextmanager
def rank_context(rank: int, world: int, local_rank: int, device_pref: str) -> Iterator[RankInfo]:
    """Join the process group (env:// rendezvous) as ``rank``; the engine acts as that rank inside."""
    from kdbench.engine.build import resolve_device

    device = resolve_device(device_pref)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        # all the node's GPUs visible (torchrun, our launcher): cuda:<local rank>; one visible
        # (submitit's TorchDistributedEnvironment().export() sets CUDA_VISIBLE_DEVICES per task): it
        index = local_rank if count > local_rank else 0 if count == 1 and env_rank() else -1
        if index < 0:
            raise ConfigError(
                f"gpus_per_cell needs GPU {local_rank} but {count} are visible; "
                "lower train.gpus_per_cell or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    info = RankInfo(rank, world, local_rank, device, runtime=sys.modules[__name__])
    ranks.enter(info)
    try:
        yield info
    finally:
        ranks.enter(None)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def env_rank() -> tuple[int, int, int] | None:
    """(rank, world, local rank) from a torchrun/submitit environment, or None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    return None


def adapt_hooks(setup: Any, hooks: list) -> list:
    """The trainer's hooks as this rank runs them: unchanged outside DDP; else the sync hook
    first and, off rank 0, no hook that writes or evaluates."""
    from kdbench.engine import train as T

    if any(isinstance(h, T.DatasetAugment) for h in hooks):
        raise ConfigError(
            "dataset-level augmenters (e.g. config) are not supported with gpus_per_cell > 1: "
            "run the cell on one process (gpus_per_cell: 1)"
        )
    if ranks.current().rank != 0:
        writers = (T.MetricsLog, T.Checkpoint, T.EpochEval, T.ProgressReport)
        hooks = [h for h in hooks if not isinstance(h, writers)]
    return [DistributedSync(setup), *hooks]


def stop_requested_all() -> bool:
    """The stop flag every rank agrees on (outside DDP: this process's flag)."""
    from kdbench.engine.train import stop_requested

    if _SYNC is None:
        return stop_requested()
    if _SYNC.stop_agreed:
        _SYNC.gather_rng()  # every rank is here, before rank 0 saves the mid-epoch checkpoint
        return True
    return False


def refuse_per_sample_state(distiller: nn.Module | None, n_train: int) -> None:
    """Methods whose buffers have a row per training sample (memory banks) cannot be sharded."""
    if distiller is None:
        return
    for name, b in distiller.named_buffers():
        if b.dim() >= 2 and b.shape[0] == n_train:
            method = getattr(distiller, "name", None) or type(distiller).__name__
            raise ConfigError(
                f"method {method} keeps per-sample state ({name}: one row per training sample) "
                "that DDP would split over ranks; run it with gpus_per_cell: 1"
            )


def refuse_batch_relational(distiller: nn.Module | None) -> None:
    """Methods whose loss relates the samples of a batch (RKD, SP, CC, PKT, DIST, MLKD, SemCKD,
    CKA-KD) would relate only a rank's B/N samples: a different loss from the single-process
    cell. Refused rather than silently changed."""
    if distiller is None or not getattr(type(distiller), "batch_relational", False):
        return
    method = getattr(distiller, "name", None) or type(distiller).__name__
    raise ConfigError(
        f"method {method} relates the samples of a batch, and under DDP each rank sees only its "
        "shard of the global batch (a different loss from the one-process cell); run it with "
        "gpus_per_cell: 1"
    )


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable (the gradient of a sum over ranks is the sum of the
    ranks' gradients)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on any device (sums all-reduced with autograd); for CPU
    ranks on gloo, where ``torch.nn.SyncBatchNorm`` refuses to run."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        n_local = x.numel() // x.shape[1]
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([float(n_local)])])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        shape = [1, c] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its BatchNorm layers synchronised over the ranks (in place where it can)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        new = CpuSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_bn(child, device)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class DistributedSync:
    """The rank's side of a trainer (a trainer hook, first in the list): sharded batches,
    gradient averaging, start from rank 0's weights, every rank's RNG states in checkpoints."""

    name = "ddp"

    def __init__(self, setup: Any):
        self.setup = setup
        self.info = ranks.current()
        self.stop_agreed = False
        self.rng: list[dict[str, Any]] | None = None
        self.trainer: Any = None

    def attach(self, trainer: Any) -> None:
        global _SYNC
        s, info = self.setup, self.info
        refuse_per_sample_state(s.distiller, len(s.train_data))
        refuse_batch_relational(s.distiller)
        # the student was converted before its feature hooks were registered (ranks.prepare)
        if trainer.stage.recipe.sync_bn and s.distiller is not None:
            convert_sync_bn(s.distiller, info.device)
        s.train_data.shard = (info.rank, info.world)
        trainer.grad_sync = self.sync_grads
        if info.rank:  # rank 0 keeps the single-process streams
            trainer.aug_gen.manual_seed(s.seed * 7919 + 17 + RANK_SEED * info.rank)
            torch.manual_seed(s.seed + RANK_SEED * info.rank)
        self.trainer = trainer
        _SYNC = self

    def before_stage(self, trainer: Any) -> None:
        """Start from rank 0's weights (after a resume every rank loaded the same checkpoint)."""
        with torch.no_grad():
            for m in (self.setup.student, self.setup.distiller):
                if m is None:
                    continue
                for t in [*m.parameters(), *m.buffers()]:
                    dist.broadcast(t.data, 0)

    def before_epoch(self, trainer: Any, epoch: int) -> None: ...

    def after_epoch(self, trainer: Any, epoch: int, row: dict[str, Any]) -> None:
        """The row's losses as means over every rank; RNG states gathered for the checkpoint
        (this hook runs before rank 0's checkpoint hook saves ``state_dict``)."""
        keys = sorted(k for k in row if k.startswith("loss_"))
        if keys:
            t = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=self.info.device)
            dist.all_reduce(t)
            row.update({k: v / self.info.world for k, v in zip(keys, t.tolist(), strict=True)})
        self.gather_rng()

    def gather_rng(self) -> None:
        mine = {"aug": self.trainer.aug_gen.get_state(), "torch": torch.get_rng_state()}
        if self.info.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.info.device)
        out: list[Any] = [None] * self.info.world
        dist.all_gather_object(out, mine)
        self.rng = out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng, "world": self.info.world} if self.rng is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng = state.get("rng")
        if not rng:
            return
        if state.get("world") != self.info.world:
            raise ConfigError(
                f"the checkpoint was written by {state.get('world')} ranks, this run has "
                f"{self.info.world}; keep gpus_per_cell x nodes or delete the cell's checkpoint.pt"
            )
        mine = rng[self.info.rank]
        self.trainer.aug_gen.set_state(mine["aug"])
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.info.device)

    def sync_grads(self) -> None:
        """Average the optimised parameters' gradients over the ranks (one flat all-reduce);
        the stop flag travels along. A gradient no rank produced stays None."""
        from kdbench.engine.train import stop_requested

        params = self.trainer.stage.params
        dev = self.info.device
        pieces = [
            (p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
            .reshape(-1)
            .to(dev)
            for p in params
        ]
        flags = torch.tensor(
            [float(p.grad is not None) for p in params] + [float(stop_requested())], device=dev
        )
        flat = torch.cat([*pieces, flags])
        dist.all_reduce(flat)
        k = len(params)
        has, stop = flat[-k - 1 : -1], flat[-1]
        offset = 0
        for p, have in zip(params, has.tolist(), strict=True):
            n = p.numel()
            if have:
                g = (flat[offset : offset + n] / self.info.world).view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            offset += n
        self.stop_agreed = bool(stop > 0)


# ---------------------------------------------------------------------------- launcher side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_cell(
    cell: Cell,
    run_dir: Path,
    progress: Callable | None = None,
    attempt: int = 1,
    loggers: Sequence[PluginKey] | None = None,
) -> CellResult | None:
    """Run a DDP cell: as this environment's rank (torchrun/Slurm tasks), else N local ranks.
    Rank 0's result (None on the other ranks of an outside launcher); rank 0 alone logs."""
    out = _launch(cell, run_dir, progress, attempt, loggers)
    return out if out is None or isinstance(out, CellResult) else CellResult.from_dict(out)


def _launch(
    cell: Cell, run_dir: Path, progress: Callable | None, attempt: int, loggers: Sequence[PluginKey] | None
) -> Any:
    from kdbench.engine.cell import run_cell

    run_dir = Path(run_dir)
    world = ranks.world_size(cell.train)
    env = env_rank()
    if env is not None:
        rank, env_world, local = env
        if env_world != world:
            return _failed(
                cell,
                run_dir,
                attempt,
                f"ConfigError: the launcher started {env_world} ranks but the cell wants "
                f"gpus_per_cell x nodes = {world}; submit it with tasks_per_node=gpus_per_cell, nodes=nodes",
            )
        from kdbench.engine.cell import prepare_teacher

        prepare_teacher(cell, run_dir)  # before joining: a teacher trains on one process
        with rank_context(rank, world, local, cell.train.device):
            result = run_cell(cell, run_dir, progress if rank == 0 else None, attempt, loggers=loggers)
        return result if rank == 0 else None
    if int(getattr(cell.train, "nodes", 1)) > 1:
        return _failed(
            cell,
            run_dir,
            attempt,
            "ConfigError: train.nodes > 1 needs a multi-node launcher (Slurm through the submitit "
            "executor with tasks_per_node=gpus_per_cell, or torchrun); locally use nodes: 1",
        )
    return _spawn(cell, run_dir, progress, attempt, world, loggers)


def _failed(cell: Any, run_dir: Path, attempt: int, error: str) -> dict:
    from kdbench.artifacts import write_json_atomic

    cdir = run_dir / "cells" / cell.id
    cdir.mkdir(parents=True, exist_ok=True)
    result = {"cell": cell.to_dict(), "attempt": attempt, "status": "failed", "error": error, "wall_s": 0.0}
    write_json_atomic(cdir / "result.json", result)
    return result


def _spawn(
    cell: Any,
    run_dir: Path,
    progress: Callable | None,
    attempt: int,
    world: int,
    loggers: Sequence[PluginKey] | None = None,
) -> dict:
    """Run ``cell`` on ``world`` spawned rank processes and return rank 0's result (or why not)."""
    t0 = time.perf_counter()
    problem = _cannot_launch(cell, run_dir, world)
    if problem is not None:
        return _failed(cell, run_dir, attempt, problem)
    ranks = _Ranks(cell, run_dir, attempt, world, loggers)
    ranks.watch(progress)
    return ranks.outcome(t0)


def _cannot_launch(cell: Any, run_dir: Path, world: int) -> str | None:
    """Train or load the teacher once, here, before the ranks need it; the reason a cell cannot
    start (a failed teacher, too few GPUs), or None."""
    from kdbench.engine.build import resolve_device
    from kdbench.engine.cell import prepare_teacher

    try:
        prepare_teacher(cell, run_dir)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if resolve_device(cell.train.device).type == "cuda" and torch.cuda.device_count() < world:
        return (
            f"ConfigError: gpus_per_cell {world} needs {world} GPUs, {torch.cuda.device_count()} are "
            "visible here (CUDA_VISIBLE_DEVICES); lower gpus_per_cell or give the cell more GPUs"
        )
    return None


class _Ranks:
    """The rank processes of one DDP cell, what they said, and how they ended."""

    def __init__(
        self, cell: Any, run_dir: Path, attempt: int, world: int, loggers: Sequence[PluginKey] | None = None
    ):
        import multiprocessing as mp

        self.cell, self.run_dir, self.attempt = cell, run_dir, attempt
        ctx = mp.get_context("spawn")
        port = _free_port()
        threads = torch.get_num_threads()
        keys = None if loggers is None else [k.to_dict() for k in loggers]  # the grid's, for rank 0
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for r in range(world):
            recv, send = ctx.Pipe(duplex=False)
            args = (cell.to_dict(), str(run_dir), attempt, r, world, port, threads, os.getpid(), send, keys)
            p = ctx.Process(target=_rank_main, args=args, name=f"kdbench-rank{r}")
            p.start()
            send.close()
            self.procs.append(p)
            self.conns.append(recv)
        self.results: dict[int, dict] = {}
        self.errors: dict[int, str] = {}
        self.stopped = self.forwarded = False
        self.progress_error: str | None = None

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()

    def watch(self, progress: Callable | None) -> None:
        """Relay progress and collect results until every rank has exited. A stop request is
        forwarded to the ranks as SIGTERM; ranks outliving a dead rank by ``GRACE_S`` are killed."""
        from multiprocessing.connection import wait

        from kdbench.engine.train import stop_requested

        dead_since: float | None = None
        try:
            open_conns = {c: r for r, c in enumerate(self.conns)}
            while self.alive() or open_conns:
                for c in wait(list(open_conns), timeout=0.2):
                    try:
                        kind, payload = c.recv()
                    except (EOFError, OSError):
                        del open_conns[c]
                        continue
                    self._heard(open_conns[c], kind, payload, progress)
                if stop_requested() and not self.forwarded:
                    self.forwarded = True
                    for p in self.procs:
                        if p.is_alive() and p.pid:
                            os.kill(p.pid, signal.SIGTERM)
                if any(p.exitcode not in (None, 0, STOP_EXIT) for p in self.procs):
                    dead_since = dead_since or time.monotonic()
                    if time.monotonic() - dead_since > GRACE_S:
                        self.kill()
                if not self.alive():  # drain what is left, then stop
                    for c in list(open_conns):
                        if not c.poll():
                            del open_conns[c]
        except BaseException:
            self.kill()
            for p in self.procs:
                p.join(5)
            raise
        for p in self.procs:
            p.join()

    def _heard(self, rank: int, kind: str, payload: Any, progress: Callable | None) -> None:
        if kind == "progress" and progress is not None and self.progress_error is None:
            try:
                progress(payload)
            except Exception as e:  # a failure of the cell, as run_cell records it
                self.progress_error = f"{type(e).__name__}: {e}"
                self.kill()
        elif kind == "result":
            self.results[rank] = payload
        elif kind == "stopped":
            self.stopped = True
        elif kind == "error":
            self.errors[rank] = payload

    def outcome(self, t0: float) -> dict:
        """Rank 0's result, with the other ranks' errors added; raises StopRequested when the
        ranks stopped on request (rank 0 saved the checkpoint)."""
        from kdbench.engine.train import StopRequested

        cell, procs = self.cell, self.procs
        if self.stopped or any(p.exitcode == STOP_EXIT for p in procs):
            raise StopRequested(f"DDP cell {cell.id} stopped on request (checkpoint saved by rank 0)")
        if self.progress_error is not None:
            return _failed(cell, self.run_dir, self.attempt, self.progress_error)
        result = self.results.get(0)
        if result is None and self.forwarded:
            raise StopRequested(f"DDP cell {cell.id} stopped on request before rank 0 finished")
        others = self._other_ranks_errors()
        if result is not None:  # a rank's error worth adding is one rank 0 did not report itself
            others = {r: e for r, e in others.items() if e and e != result.get("error")}
        if result is None:
            result = self._no_result(others, t0)
        elif result.get("status") == "failed" and others:
            result["error"] = (
                result.get("error", "") + "; " + "; ".join(f"rank {r}: {e}" for r, e in others.items())
            )
        else:
            return result
        from kdbench.artifacts import write_json_atomic

        write_json_atomic(self.run_dir / "cells" / cell.id / "result.json", result)
        return result

    def _other_ranks_errors(self) -> dict[int, str]:
        from kdbench.procs import death_reason

        failed = {r: res for r, res in self.results.items() if r and res.get("status") == "failed"}
        others = {r: res.get("error") for r, res in failed.items()}
        others.update({r: e for r, e in self.errors.items() if r})
        for r, p in enumerate(self.procs):  # ranks that died without a word (OOM killer, a crash)
            if r and r not in self.results and r not in self.errors and p.exitcode not in (0, STOP_EXIT):
                others[r] = death_reason(p.exitcode)
        return others

    def _no_result(self, others: dict[int, str], t0: float) -> dict:
        from kdbench.procs import death_reason

        reasons = [f"rank {r}: {e}" for r, e in sorted({**self.errors, **others}.items()) if e]
        codes = ", ".join(f"rank {r} exit {p.exitcode}" for r, p in enumerate(self.procs))
        why = "; ".join(reasons) or ", ".join(
            f"rank {r} {death_reason(p.exitcode)}" for r, p in enumerate(self.procs)
        )
        return {
            "cell": self.cell.to_dict(),
            "attempt": self.attempt,
            "status": "failed",
            "error": f"DDP rank 0 left no result ({codes}): {why}",
            "wall_s": time.perf_counter() - t0,
        }


def _rank_main(
    cell_dict: dict,
    run_dir: str,
    attempt: int,
    rank: int,
    world: int,
    port: int,
    threads: int,
    parent_pid: int,
    conn: Any,
    loggers: list[dict] | None = None,
) -> None:
    """A spawned rank: join the group, run the cell as this rank, report to the launcher."""
    from kdbench.procs import die_with_parent

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides what Ctrl-C means
    from kdbench.engine.train import StopRequested, request_stop

    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, threads))
    from kdbench.engine.cell import run_cell

    cell = Cell.from_dict(cell_dict)

    def progress(row: dict) -> None:
        conn.send(("progress", row))

    code = 0
    try:
        with rank_context(rank, world, rank, cell.train.device):
            keys = None if loggers is None else [PluginKey.model_validate(k) for k in loggers]
            result = run_cell(cell, Path(run_dir), progress if rank == 0 else None, attempt, loggers=keys)
        conn.send(("result", result.to_dict()))
    except StopRequested:
        conn.send(("stopped", None))
        code = STOP_EXIT
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc(limit=5)))
        code = 1
    finally:
        conn.close()
    os._exit(code)
