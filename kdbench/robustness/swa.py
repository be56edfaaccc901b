"""Stochastic weight averaging (Izmailov et al., UAI 2018) as a training hook.

The teacher recipe of the Keras "consistency training with supervision" example, usable for
any model (``teacher_train: {swa: ...}``, or ``train: {swa: ...}`` for students)::

    teacher_train:
      swa: {start: 0.75, lr: null, anneal_epochs: 1}

From epoch ``⌊start · epochs⌋`` (0-based) the learning rate is annealed (cosine, over
``anneal_epochs``) to ``lr`` (default: half the stage's base lr) by
``torch.optim.swa_utils.SWALR``, and after every such epoch the weights join a running average
(``AveragedModel``). After the last epoch the average replaces the model's weights and the
BatchNorm statistics are recomputed over one pass of the training split, augmented as in
training (``update_bn``). Averages and scheduler are saved in checkpoints, so a killed run
resumes exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from kdbench.cells import SWA_DEFAULTS, check_swa  # noqa: F401 - the setting is a record's
from kdbench.engine.hooks import Hook, Trainer

#: a :class:`kdbench.engine.train.TrainSetup` (not imported: the trainer builds this hook)
TrainSetup = Any

#: seed of the augmentation draws of the final BatchNorm pass
BN_SEED = 104729


class SWA(Hook):
    """Weight averaging over the last epochs of the train stage (see the module docstring)."""

    name = "swa"

    def __init__(
        self, setup: TrainSetup, start: float = 0.75, lr: float | None = None, anneal_epochs: int = 1
    ) -> None:
        self.setup = setup
        self.start = float(start)
        self.lr = lr
        self.anneal_epochs = int(anneal_epochs)
        self.avg: AveragedModel | None = None
        self.sched: SWALR | None = None
        self.first = 0

    def attach(self, trainer: Trainer) -> None:
        epochs = trainer.stage.epochs
        self.first = min(int(math.floor(self.start * epochs)), max(epochs - 1, 0))
        base = trainer.stage.recipe.lr
        self.avg = AveragedModel(self.setup.student)
        lrs = [g["lr"] for g in trainer.opt.param_groups]
        self.sched = SWALR(
            trainer.opt,
            swa_lr=self.lr if self.lr is not None else 0.5 * base,
            anneal_epochs=max(self.anneal_epochs, 1),
            anneal_strategy="cos",
        )
        for g, lr in zip(trainer.opt.param_groups, lrs, strict=True):
            g["lr"] = lr  # building SWALR must not change the lr before SWA starts

    def before_epoch(self, trainer: Trainer, epoch: int) -> None:
        # from the SWA epoch on, SWALR owns the lr (the stage schedule stepped it already)
        if epoch < self.first or self.sched is None:
            return
        if self.anneal_epochs == 0:
            for g in trainer.opt.param_groups:
                g["lr"] = g["swa_lr"]
            return
        if epoch > self.first:  # undo the stage schedule's step: anneal from SWALR's own last lr
            for g, lr in zip(trainer.opt.param_groups, self.sched.get_last_lr(), strict=True):
                g["lr"] = lr
        self.sched.step()

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        assert self.avg is not None
        if epoch < self.first:
            return
        self.avg.update_parameters(self.setup.student)
        row["swa_n"] = int(self.avg.n_averaged)
        if epoch + 1 == trainer.stage.epochs:
            self.finish()

    def finish(self) -> None:
        """Copy the averaged weights into the model and recompute its BatchNorm statistics."""
        assert self.avg is not None
        s = self.setup
        model = s.student
        with torch.no_grad():
            for p, q in zip(model.parameters(), self.avg.module.parameters(), strict=True):
                p.copy_(q)
        gen = torch.Generator().manual_seed(BN_SEED)
        batches = (s.augment(x.to(s.device), gen) for x, _, _ in s.train_data.iterate(None, False))
        was = model.training
        update_bn(batches, model, device=s.device)
        model.train(was)

    def state_dict(self) -> dict[str, Any]:
        if self.avg is None or self.sched is None:
            return {}
        return {"avg": self.avg.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.avg is not None and self.sched is not None:
            self.avg.load_state_dict(state["avg"])
            self.sched.load_state_dict(state["sched"])
