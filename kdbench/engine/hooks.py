"""The trainer's hook contract (kdbench/engine/train.py runs them): timing, LR schedule,
checkpoints, SWA (kdbench/robustness/swa.py) and DDP sync are hooks."""

from __future__ import annotations

from typing import Any

#: a :class:`kdbench.engine.train.Trainer` (not imported: the trainer imports this module)
Trainer = Any


class Hook:
    """Called around a stage's epochs; its ``state_dict`` is saved in every checkpoint."""

    name = "hook"

    def attach(self, trainer: Trainer) -> None:
        """Called once when the trainer is built (before a checkpoint's state is loaded)."""

    def before_stage(self, trainer: Trainer) -> None: ...

    def before_epoch(self, trainer: Trainer, epoch: int) -> None: ...

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
