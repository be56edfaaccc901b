"""Which rank of a DDP cell this process is, if any: the one thing the single-process engine
asks about distribution.

The trainer and the cell runner read :func:`current` / :func:`is_writer` and hand their hooks
to :func:`adapt_hooks`; the DDP code (``kdbench.engine.distributed``) enters a rank with
:func:`enter` and supplies the behaviour (``runtime``). The engine never imports the DDP module,
so a single-process cell never enters it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    #: the DDP side: an object with ``adapt_hooks(setup, hooks)``, ``stop_requested_all()``,
    #: ``prepare(module)`` and ``describe()`` (kdbench/engine/distributed.py)
    runtime: Any = None


_CURRENT: RankInfo | None = None


def enter(info: RankInfo | None) -> None:
    """Act as rank ``info`` from now on (None: a single process again)."""
    global _CURRENT
    _CURRENT = info


def current() -> RankInfo | None:
    """This process's rank within a DDP cell, or None outside one."""
    return _CURRENT


def is_writer() -> bool:
    """True outside DDP and on rank 0: the only process that writes the cell's files."""
    return _CURRENT is None or _CURRENT.rank == 0


def world_size(train: Any) -> int:
    """Ranks a cell with recipe ``train`` runs on (``gpus_per_cell`` x ``nodes``)."""
    return int(getattr(train, "gpus_per_cell", 1) or 1) * int(getattr(train, "nodes", 1) or 1)


def describe() -> dict[str, Any]:
    """``{"ddp": {world, backend, device}}`` for a result's env inside a DDP cell, else {}."""
    return {} if _CURRENT is None else _CURRENT.runtime.describe()


def adapt_hooks(setup: Any, hooks: list) -> list:
    """The trainer's hooks as this rank runs them (unchanged outside DDP)."""
    return hooks if _CURRENT is None else _CURRENT.runtime.adapt_hooks(setup, hooks)


def prepare(module: Any, sync_bn: bool) -> Any:
    """``module`` as this rank trains it: its BatchNorm layers synchronised when ``sync_bn``
    (done before any feature hook is registered, so a tap on a BatchNorm stays valid)."""
    if _CURRENT is None or not sync_bn:
        return module
    return _CURRENT.runtime.convert_sync_bn(module, _CURRENT.device)


def stop_agreed(local_flag: bool) -> bool:
    """The stop flag every rank agrees on (outside DDP: ``local_flag``)."""
    return local_flag if _CURRENT is None else _CURRENT.runtime.stop_requested_all()
