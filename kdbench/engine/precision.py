"""GPU training done right: mixed precision, channels_last, torch.compile, data kept on the device.

A cell's ``train`` recipe chooses (each in the cell id only when not at its default):

- ``precision: fp32 | bf16 | fp16``: the stage's loss (student, teacher and method forwards) runs
  under ``torch.autocast``; fp16 adds a ``torch.amp.GradScaler`` (saved in checkpoints). The
  optimiser keeps fp32 master weights (autocast never changes parameter dtypes), and the fused
  KD/DKD kernels accumulate bf16/fp16 logits in fp32.
- ``channels_last: true``: student and teacher weights and 4-d inputs in NHWC (tensor cores).
- ``compile: true``: ``nn.Module.compile`` of student and teacher, in place, so module paths,
  forward hooks (feature taps) and state dicts are unchanged.

Not in the id (they never change a number): on a CUDA device the images of an in-memory
(``TensorDataset``) training split are copied to the device once (batches are gathered there;
augmenters already work on the batch's device), and ``DataLoader`` splits (image folders) use
pinned memory so the per-batch copy is asynchronous (``non_blocking``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: backend of ``compile: true`` (tests use "eager")
COMPILE_BACKEND = "inductor"


class Amp:
    """A stage's arithmetic: ``autocast()`` around the loss, ``step(loss, opt)`` for the update."""

    def __init__(self, recipe: Any, device: torch.device):
        self.precision = getattr(recipe, "precision", None) or "fp32"
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        self.dtype = DTYPES[self.precision]
        self.device_type = torch.device(device).type
        self.channels_last = bool(getattr(recipe, "channels_last", False))
        self.scaler = torch.amp.GradScaler(self.device_type) if self.dtype is torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def input(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def step(self, loss: Tensor, opt: torch.optim.Optimizer, sync: Callable[[], None] | None = None) -> None:
        """Backward, ``sync`` (DDP: gradients averaged over ranks) and optimiser step (fp16: scaled,
        skipped when a gradient overflowed)."""
        if self.scaler is None:
            loss.backward()
            if sync is not None:
                sync()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        if sync is not None:
            sync()  # scaled gradients: an overflow on any rank reaches every rank
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def prepare_model(model: nn.Module | None, recipe: Any) -> None:
    """channels_last and compile, in place (idempotent: a shared teacher may be prepared twice)."""
    if model is None:
        return
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.compile and not getattr(model, "_kdbench_compiled", False):
        model.compile(backend=COMPILE_BACKEND)
        model._kdbench_compiled = True  # type: ignore[assignment]


def keep_on_device(batches: Any, device: torch.device) -> None:
    """Move an in-memory split's images to ``device`` once; pin a DataLoader split's batches.

    Only plain in-memory splits (no hold-out indices, no generated samples) move: their batches
    are gathered by one index on the device. Does nothing on CPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    data = getattr(batches, "data", None)
    if not getattr(batches, "indexable", False):
        batches.pin_memory = True
        return
    if batches.indices is not None or batches.extra_y is not None:
        return
    if callable(getattr(data, "to_device", None)):  # uint8 on the device, normalised there per batch
        data.to_device(device)
    elif type(data) is TensorDataset:
        data.tensors = (data.tensors[0].to(device), *data.tensors[1:])
