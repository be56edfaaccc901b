"""The training loop shared by teachers (plain CE) and students (a Distiller).

One run is a list of :class:`Stage` objects (an optional ``init`` stage, then ``train``), each
run by a :class:`Trainer`: ``run`` loops over epochs, :meth:`Trainer.train_epoch` over batches,
:meth:`Trainer.train_step` does one optimiser step. Everything else is a :class:`Hook` with a
``state_dict`` (the lr schedule, per-epoch evaluation, the metrics log, dataset-level
augmenters, checkpoints, progress), in the spirit of detectron2's ``TrainerBase``.

The engine knows no method by name: it asks the method which taps it reads, runs the
teacher's forward as its own step (eval mode, ``no_grad``) on the teacher's view, weights the
terms the method returns, and checkpoints after every epoch so a killed run resumes where it
stopped with the same numbers (models, optimiser, schedule, hooks and every RNG state).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.artifacts import load_checked, load_checkpoint, save_atomic, save_checked
from kdbench.cells import TrainRecipe
from kdbench.engine import ranks
from kdbench.engine.data import Batches, DatasetAugmentContext, ExtraSamples
from kdbench.engine.hooks import Hook
from kdbench.engine.precision import Amp, keep_on_device, prepare_model
from kdbench.features import FeatureReader, Features
from kdbench.loggers import CellLoggers
from kdbench.methods.base import Batch, Distiller

Progress = Callable[[dict[str, Any]], None]
View = Callable[[Tensor, torch.Generator], Tensor]
CHECKPOINT_FORMAT = 2
#: where a trainer is: (stage name, epoch, step), yielded before each optimiser step
StepPos = tuple[str, int, int]
_R = TypeVar("_R")
_STOP = threading.Event()


class StopRequested(KeyboardInterrupt):
    """Training stopped at a step boundary on :func:`request_stop` (its checkpoint is saved)."""


def request_stop() -> None:
    """Ask every trainer in this process to checkpoint at its next step boundary and stop
    (raising :class:`StopRequested`); safe to call from a signal handler (SIGTERM)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def clear_stop() -> None:
    _STOP.clear()


class TimeLimitReached(RuntimeError):
    """A cell ran past its time limit; it checkpointed at a step boundary first (a rerun or a
    retry resumes there)."""

    retryable = True


#: (monotonic deadline, the limit in seconds) of the cells running in this process, or None
_DEADLINE: tuple[float, float] | None = None


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Trainers started inside stop at the first step boundary after ``seconds`` of wall time
    (checkpoint, then :class:`TimeLimitReached`); None: no limit. A DDP cell ignores it (its
    ranks would disagree on the step); its scheduler's own limit applies."""
    global _DEADLINE
    saved = _DEADLINE
    _DEADLINE = None if seconds is None else (time.monotonic() + float(seconds), float(seconds))
    try:
        yield
    finally:
        _DEADLINE = saved


def _past_deadline() -> float | None:
    """The limit in seconds when it has been reached (outside DDP), else None."""
    if _DEADLINE is None or ranks.current() is not None or time.monotonic() < _DEADLINE[0]:
        return None
    return _DEADLINE[1]


def format_seconds(s: float) -> str:
    """90 -> "90 s", 5400 -> "1.5 h"."""
    if s >= 3600:
        return f"{s / 3600:g} h"
    if s >= 120:
        return f"{s / 60:g} min"
    return f"{s:g} s"


@dataclass
class TrainSetup:
    """What one training run needs; ``distiller`` None means plain cross-entropy.

    ``augment`` is the student's view; ``teacher_augment`` the teacher's (None: the teacher sees
    the student's augmented batch). ``weights`` are the resolved loss weights (with "ce").
    ``epoch_eval`` returns flat per-epoch metrics (``test/top1``...), called every ``eval_every``
    epochs of the train stage (0: never).
    """

    student: nn.Module
    student_reader: FeatureReader
    recipe: TrainRecipe
    train_data: Batches
    device: torch.device
    seed: int
    augment: View
    distiller: Distiller | None = None
    teacher_reader: FeatureReader | None = None
    teacher_augment: View | None = None
    #: applied to the raw batch before ``augment`` (the grid's base augmentation under a method
    #: view, kdbench/engine/views.py); the ``clean`` teacher view sees its output
    base_augment: View | None = None
    views: dict[str, View] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})
    workdir: Path | None = None  # checkpoint.pt, metrics.jsonl and extra/ live here
    progress: Progress | None = None
    epoch_eval: Callable[[], dict[str, float]] | None = None
    eval_every: int = 0
    dataset_augmenters: list[Any] = field(default_factory=list)
    log: logging.Logger | None = None
    #: where each epoch's row is reported besides ``metrics.jsonl`` (the cell's TensorBoard,
    #: W&B, MLflow runs: kdbench/loggers); None: nowhere else
    loggers: CellLoggers | None = None
    #: the module replacing the CE term (``recipe.objective``, e.g. group DRO), built by
    #: :func:`train_steps`; its state (group weights) is checkpointed
    objective: nn.Module | None = None
    #: teacher outputs read from a soft-label bank instead of the teacher's forward (a
    #: kdbench.engine.softlabels.Replay; ``teacher_outputs: replay``); None: computed
    replay: Any = None


def make_optimizer(params: list[nn.Parameter], r: TrainRecipe) -> torch.optim.Optimizer:
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)


def lr_factor(r: TrainRecipe, epoch: int) -> float:
    """Multiplier of the base lr at ``epoch`` (0-based); milestones < 1 are fractions of epochs."""
    epochs = max(r.epochs, 1)
    if r.warmup_epochs and epoch < r.warmup_epochs:
        return (epoch + 1) / r.warmup_epochs
    if r.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if r.schedule == "step":
        marks = [m * epochs if m < 1 else m for m in r.milestones]
        return r.gamma ** sum(epoch >= m for m in marks)
    return 1.0


# --------------------------------------------------------------------------------- stages


@dataclass
class StepInput:
    """One batch as the loss of a stage receives it (views not yet applied)."""

    x: Tensor
    y: Tensor
    index: Tensor
    meta: dict[str, Tensor]
    epoch: int
    epochs: int
    step: int
    generator: torch.Generator


LossFn = Callable[[StepInput], dict[str, Tensor]]


@dataclass
class Stage:
    """A run of ``epochs`` epochs optimising ``params`` with ``loss`` (weighted terms)."""

    name: str  # "init" | "train"
    epochs: int
    params: list[nn.Parameter]
    loss: LossFn
    recipe: TrainRecipe  # the cell's, with this stage's epochs and lr
    data_seed: int


class Trainer:
    """Runs one :class:`Stage`: epochs of batches of optimiser steps, hooks around them."""

    def __init__(self, setup: TrainSetup, stage: Stage, hooks: list[Hook]):
        self.setup = setup
        self.stage = stage
        self.hooks = hooks
        self.opt = make_optimizer(stage.params, stage.recipe)
        self.data_gen = torch.Generator().manual_seed(stage.data_seed)
        self.aug_gen = torch.Generator(device="cpu").manual_seed(aug_seed(setup.seed))
        self.sampler = stage.recipe.sampler
        self.amp = Amp(stage.recipe, setup.device)  # precision, GradScaler, channels_last inputs
        #: a mid-epoch checkpoint's position: batches of the epoch already done and their loss sums
        self.resume_step = 0
        self.partial: dict[str, Any] = {}
        self.checkpointer = next((h for h in hooks if isinstance(h, Checkpoint)), None)
        #: called between backward and the optimiser step (DDP: averages gradients over ranks)
        self.grad_sync: Callable[[], None] | None = None
        for h in hooks:
            h.attach(self)

    def state_dict(self) -> dict[str, Any]:
        return {
            "opt": self.opt.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "aug_gen": self.aug_gen.get_state(),
            "hooks": {h.name: h.state_dict() for h in self.hooks},
            "amp": self.amp.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.data_gen.set_state(state["data_gen"])
        self.aug_gen.set_state(state["aug_gen"])
        for h in self.hooks:
            h.load_state_dict(state["hooks"].get(h.name, {}))
        self.amp.load_state_dict(state.get("amp") or {})
        self.partial = dict(state.get("partial") or {})
        self.resume_step = int(self.partial.get("step", 0))

    def run(self, start_epoch: int = 0) -> None:
        drain(self.steps(start_epoch))

    def steps(self, start_epoch: int = 0) -> Iterator[StepPos]:
        """:meth:`run` as a generator: yields ``(stage, epoch, step)`` before each optimiser step
        (kdbench.engine.lockstep advances several cells' trainers side by side with it)."""
        for h in self.hooks:
            h.before_stage(self)
        for epoch in range(start_epoch, self.stage.epochs):
            if not (epoch == start_epoch and self.resume_step):  # a resumed epoch has begun already
                for h in self.hooks:
                    h.before_epoch(self, epoch)
            row = yield from self.epoch_steps(epoch)
            for h in self.hooks:
                h.after_epoch(self, epoch, row)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        return drain(self.epoch_steps(epoch))

    def epoch_steps(self, epoch: int) -> Generator[StepPos, None, dict[str, Any]]:
        """:meth:`train_epoch` as a generator (yields before each step, returns the row).

        Before each step it honours :func:`request_stop`: a checkpoint of this exact position
        (the epoch's data order, the step, the augmentation RNG, partial loss sums), then
        :class:`StopRequested`. A trainer loaded from it skips the batches already done.
        """
        s = self.setup
        s.student.train()
        if s.distiller is not None:
            s.distiller.train()
        epoch_order = self.data_gen.get_state()  # this epoch's data order derives from it
        skip, self.resume_step = self.resume_step, 0
        totals: dict[str, float] = dict(self.partial.get("totals", {})) if skip else {}
        n = int(self.partial.get("n", 0)) if skip else 0
        lr = self.opt.param_groups[0]["lr"]
        batches = s.train_data.iterate(self.data_gen, sampler=self.sampler, skip_batches=skip)
        for step, (x, y, idx) in enumerate(batches, start=skip):
            if ranks.stop_agreed(stop_requested()):  # DDP: the flag every rank agreed on
                if self.checkpointer is not None:
                    self.checkpointer.save_mid_epoch(self, epoch, step, epoch_order, totals, n)
                raise StopRequested(f"stopped at {self.stage.name} epoch {epoch + 1} step {step}")
            limit = _past_deadline()
            if limit is not None:
                if self.checkpointer is not None:
                    self.checkpointer.save_mid_epoch(self, epoch, step, epoch_order, totals, n)
                raise TimeLimitReached(
                    f"time limit of {format_seconds(limit)} reached at {self.stage.name} epoch "
                    f"{epoch + 1} step {step}; checkpoint kept: a rerun or retry resumes there"
                )
            yield (self.stage.name, epoch, step)
            terms = self.train_step(x, y, idx, epoch, step)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
        return {
            "stage": self.stage.name,
            "epoch": epoch,
            "lr": lr,
            **{f"loss_{k}": v / max(n, 1) for k, v in totals.items()},
        }

    def train_step(self, x: Tensor, y: Tensor, idx: Tensor, epoch: int, step: int) -> dict[str, float]:
        s = self.setup
        dev = s.device
        meta = {k: v.to(dev, non_blocking=True) for k, v in s.train_data.meta_at(idx).items()}
        inp = StepInput(
            x=self.amp.input(x.to(dev, non_blocking=True)),
            y=y.to(dev, non_blocking=True),
            index=idx.to(dev),
            meta=meta,
            epoch=epoch,
            epochs=self.stage.epochs,
            step=step,
            generator=self.aug_gen,
        )
        with self.amp.autocast():
            terms = self.stage.loss(inp)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            values = {k: float(v.detach()) for k, v in terms.items()}
            raise FloatingPointError(
                f"{self.stage.name} loss is {float(loss.detach())} at epoch {epoch + 1} step {step} "
                f"(terms {values}); lower the lr or the method's weights"
            )
        self.opt.zero_grad(set_to_none=True)
        self.amp.step(loss, self.opt, self.grad_sync)
        return {k: float(v.detach()) for k, v in terms.items()}


# ---------------------------------------------------------------------------------- hooks


class LRSchedule(Hook):
    """The stage's lr schedule (a ``LambdaLR`` over :func:`lr_factor`), stepped per epoch."""

    name = "lr"

    def __init__(self) -> None:
        self.sched: torch.optim.lr_scheduler.LambdaLR | None = None

    def attach(self, trainer: Trainer) -> None:
        r = trainer.stage.recipe
        self.sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, lambda e: lr_factor(r, e))

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        assert self.sched is not None
        self.sched.step()

    def state_dict(self) -> dict[str, Any]:
        return self.sched.state_dict() if self.sched is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.sched is not None:
            self.sched.load_state_dict(state)


class Timing(Hook):
    """Wall time of each epoch's training part (``train_s``), before evaluation."""

    name = "timing"

    def attach(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()

    def before_epoch(self, trainer: Trainer, epoch: int) -> None:
        self.t0 = time.perf_counter()

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        row["train_s"] = round(time.perf_counter() - self.t0, 3)


class EpochEval(Hook):
    """Cheap evaluation (test, val) every ``every`` epochs of the train stage, into the row."""

    name = "eval"

    def __init__(self, fn: Callable[[], dict[str, float]], every: int):
        self.fn, self.every = fn, every

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        if self.every and (epoch + 1) % self.every == 0:
            t0 = time.perf_counter()
            row.update(self.fn())
            row["eval_s"] = round(time.perf_counter() - t0, 3)


class MetricsLog(Hook):
    """Appends each epoch's row to ``metrics.jsonl`` and hands it to the cell's loggers."""

    name = "metrics"

    def __init__(self, path: Path, loggers: CellLoggers | None = None):
        self.path, self.loggers = path, loggers

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.loggers is not None:
            self.loggers.log_row(row)


class DatasetAugment(Hook):
    """Dataset-level augmenters: extra samples before each train epoch, saved for resume."""

    name = "dataset_augment"

    def __init__(self, setup: TrainSetup, augmenters: list[Any]):
        self.setup = setup
        self.augmenters = augmenters
        self.gen = torch.Generator().manual_seed(setup.seed * 1000003 + 7)

    def before_epoch(self, trainer: Trainer, epoch: int) -> None:
        s = self.setup
        assert s.workdir is not None
        ctx = DatasetAugmentContext(
            student=s.student,
            teacher=s.teacher_reader.model if s.teacher_reader is not None else None,
            train=s.train_data,
            device=s.device,
            cell_dir=s.workdir,
            generator=self.gen,
            epoch=epoch,
            epochs=trainer.stage.epochs,
        )
        for i, aug in enumerate(self.augmenters):
            extra = aug.on_epoch_start(epoch, ctx)
            if extra is not None and len(extra.y):
                save_checked(extra.to_dict(), extra_path(s.workdir, epoch, i))
                if extra.replace:
                    s.train_data.clear_samples()
                s.train_data.add_samples(extra.x, extra.y, extra.meta)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "gen" in state:
            self.gen.set_state(state["gen"])


def extra_path(workdir: Path, epoch: int, i: int) -> Path:
    return workdir / "extra" / f"epoch{epoch:04d}-{i}.pt"


def restore_extra_samples(workdir: Path, data: Batches, epochs_done: int) -> None:
    """Re-add the samples generated before ``epochs_done``; drop later (uncheckpointed) ones."""
    d = workdir / "extra"
    if not d.exists():
        return
    for p in sorted(d.glob("epoch*-*.pt")):
        epoch = int(p.name[5:9])
        if epoch < epochs_done:
            e = ExtraSamples.from_dict(load_checked(p))
            if e.replace:
                data.clear_samples()
            data.add_samples(e.x, e.y, e.meta)
        else:
            p.unlink()
            p.with_name(p.name + ".sha256").unlink(missing_ok=True)


class Checkpoint(Hook):
    """Saves models, optimiser, hooks and RNG states every ``every`` epochs (not after the last)."""

    name = "checkpoint"

    def __init__(self, setup: TrainSetup, path: Path, every: int):
        self.setup, self.path, self.every = setup, path, every

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        done = epoch + 1
        if not self.every or done % self.every or done >= trainer.stage.epochs:
            return
        self.save(trainer, done, trainer.state_dict())

    def save_mid_epoch(
        self, trainer: Trainer, epoch: int, step: int, epoch_order: Tensor, totals: dict, n: int
    ) -> None:
        """A checkpoint before ``step`` of ``epoch`` (which resumes there, bit-exactly)."""
        state = trainer.state_dict()
        state["data_gen"] = epoch_order
        state["partial"] = {"step": step, "totals": dict(totals), "n": n}
        self.save(trainer, epoch, state)

    def save(self, trainer: Trainer, epoch: int, trainer_state: dict[str, Any]) -> None:
        s = self.setup
        state = {
            "format": CHECKPOINT_FORMAT,
            "stage": trainer.stage.name,
            "epoch": epoch,  # epochs done; with trainer.partial.step, the epoch under way
            "student": s.student.state_dict(),
            "distiller": s.distiller.state_dict() if s.distiller is not None else None,
            **({"objective": s.objective.state_dict()} if s.objective is not None else {}),
            "trainer": trainer_state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        save_atomic(state, self.path)


class ProgressReport(Hook):
    """Calls the runner's progress callback with each epoch's row (may raise to stop)."""

    name = "progress"

    def __init__(self, fn: Progress):
        self.fn = fn

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        self.fn({**row, "epoch": epoch + 1, "epochs": trainer.stage.epochs})


# ------------------------------------------------------------------------------- training


def _truncate_metrics(path: Path, stage: str, epochs_done: int) -> None:
    """Keep only the rows the checkpoint covers (a killed run may have written more)."""
    if not path.exists():
        return
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def covered(r: dict) -> bool:
        if r.get("stage") == stage:
            return r.get("epoch", 0) < epochs_done
        return stage == "train" and r.get("stage") == "init"  # the init stage finished before

    keep = [json.dumps(r) for r in rows if covered(r)]
    path.write_text("".join(ln + "\n" for ln in keep))


def _weighted(terms: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    return {k: weights.get(k, 1.0) * v for k, v in terms.items() if weights.get(k, 1.0) != 0.0}


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def _teacher_features(setup: TrainSetup, x: Tensor) -> Features:
    """The teacher's forward as its own step: eval mode, no grad, detached outputs."""
    if setup.teacher_reader is None:
        return Features()
    return setup.teacher_reader.read(x).detach()


def clean(x: Tensor, generator: torch.Generator) -> Tensor:
    """The teacher view ``clean``: the batch as the base augmentation left it."""
    return x


def _views(setup: TrainSetup, inp: StepInput) -> tuple[Tensor, Tensor]:
    """(student view, teacher view) of a batch (the rule: kdbench/engine/views.py)."""
    x = inp.x if setup.base_augment is None else setup.base_augment(inp.x, inp.generator)
    xs = setup.augment(x, inp.generator)
    if setup.teacher_augment is None:
        return xs, xs
    if setup.teacher_augment is clean:
        return xs, x
    return xs, setup.teacher_augment(inp.x, inp.generator)


def _batch(inp: StepInput, xs: Tensor, views: dict | None = None) -> Batch:
    return Batch(
        x=xs,
        y=inp.y,
        index=inp.index,
        epoch=inp.epoch,
        epochs=inp.epochs,
        step=inp.step,
        views=views or {},
        meta=inp.meta,
    )


def distill_loss(setup: TrainSetup) -> LossFn:
    """Weighted terms of the train stage: plain CE without a method, else method + CE."""
    d, w = setup.distiller, setup.weights

    def loss(inp: StepInput) -> dict[str, Tensor]:
        xs, xt = _views(setup, inp)
        s = setup.student_reader.read(xs)
        if d is None:
            return {"ce": _ce(setup, s.logits, inp)}
        t = _teacher_features(setup, xt)
        views = {}
        for name in d.views:
            xv = setup.views[name](inp.x, inp.generator) if name in setup.views else xs
            views[name] = (setup.student_reader.read(xv), _teacher_features(setup, xv))
        terms = dict(d(s, t, _batch(inp, xs, views)))
        if w.get("ce", 0.0) != 0.0:
            terms["ce"] = _ce(setup, d.predict(s), inp)
        return _weighted(terms, w)

    return loss


def _ce(setup: TrainSetup, logits: Tensor, inp: StepInput) -> Tensor:
    """The student's CE term: cross-entropy, or the recipe's objective over the batch's groups."""
    if setup.objective is None:
        return F.cross_entropy(logits, inp.y)
    return setup.objective(logits, inp.y, inp.meta["group"])


def init_loss(setup: TrainSetup) -> LossFn:
    """Weighted terms of a method's initialisation stage."""
    d = setup.distiller
    assert d is not None

    def loss(inp: StepInput) -> dict[str, Tensor]:
        xs, xt = _views(setup, inp)
        s = setup.student_reader.read(xs)
        t = _teacher_features(setup, xt)
        return _weighted(dict(d.init_loss(s, t, _batch(inp, xs))), setup.weights)

    return loss


def aug_seed(seed: int) -> int:
    """Seed of a trainer's augmentation generator (a soft-label bank draws the same crops)."""
    return seed * 7919 + 17


def train_data_seed(seed: int) -> int:
    """Seed of the train stage's data order (a soft-label bank draws the same order)."""
    return seed * 1000003


def stages(setup: TrainSetup) -> list[Stage]:
    """The init stage (methods that have one), then the train stage."""
    d, r = setup.distiller, setup.recipe
    out = []
    if d is not None and d.init_epochs > 0:
        init = r.model_copy(update={"epochs": d.init_epochs, "lr": r.init_lr or r.lr})
        out.append(Stage("init", d.init_epochs, [], init_loss(setup), init, setup.seed * 1000003 + 1))
    loss = distill_loss(setup) if setup.replay is None else setup.replay.loss(setup)
    out.append(Stage("train", r.epochs, [], loss, r, train_data_seed(setup.seed)))
    return out


def _params(setup: TrainSetup, stage: Stage) -> list[nn.Parameter]:
    d = setup.distiller
    if stage.name == "init":
        assert d is not None
        return _unique(d.init_parameters(setup.student))
    return _unique(list(setup.student.parameters()) + (list(d.parameters()) if d else []))


def _hooks(setup: TrainSetup, stage: Stage, ckpt: Path | None) -> list[Hook]:
    hooks: list[Hook] = [LRSchedule(), Timing()]
    if stage.name == "train" and stage.recipe.swa:
        from kdbench.robustness.swa import SWA  # stochastic weight averaging (teacher recipes)

        hooks.insert(1, SWA(setup, **stage.recipe.swa))
    if stage.name == "train" and setup.dataset_augmenters:
        hooks.append(DatasetAugment(setup, setup.dataset_augmenters))
    if stage.name == "train" and setup.epoch_eval is not None and setup.eval_every:
        hooks.append(EpochEval(setup.epoch_eval, setup.eval_every))
    if setup.workdir is not None:
        hooks.append(MetricsLog(setup.workdir / "metrics.jsonl", setup.loggers))
    if ckpt is not None:
        hooks.append(Checkpoint(setup, ckpt, setup.recipe.checkpoint_every))
    if setup.progress is not None:
        hooks.append(ProgressReport(setup.progress))
    return ranks.adapt_hooks(setup, hooks)  # DDP ranks: gradient sync; writers on rank 0 only


def _upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint (flat optimiser/scheduler state) in today's layout."""
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        return ckpt
    return {
        **ckpt,
        "stage": ckpt["tag"],
        "trainer": {
            "opt": ckpt["opt"],
            "data_gen": ckpt["data_gen"],
            "aug_gen": ckpt["aug_gen"],
            "hooks": {"lr": ckpt["sched"]},
        },
    }


def drain(gen: Generator[Any, None, _R]) -> _R:
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as e:
            return e.value


def train(setup: TrainSetup) -> dict[str, Any]:
    """Train every stage (resuming from ``workdir/checkpoint.pt`` when it can be read).

    Returns the last epoch's row (losses, lr, timings).
    """
    return drain(train_steps(setup))


def train_steps(setup: TrainSetup) -> Generator[StepPos, None, dict[str, Any]]:
    """:func:`train` as a generator: yields ``(stage, epoch, step)`` before each optimiser step."""
    for m in (setup.student, setup.teacher_reader.model if setup.teacher_reader else None):
        prepare_model(m, setup.recipe)  # channels_last, compile (engine/precision.py)
    if not setup.dataset_augmenters:
        keep_on_device(setup.train_data, setup.device)
    if setup.objective is None and getattr(setup.recipe, "objective", None) is not None:
        from kdbench.methods.groupdro import build_objective

        groups = setup.train_data.meta.get("group")
        n = setup.train_data.n_base  # the split's own samples: its group counts
        setup.objective = build_objective(setup.recipe.objective, None if groups is None else groups[:n])
        setup.objective.to(setup.device)
    ckpt_path = setup.workdir / "checkpoint.pt" if setup.workdir else None
    resume = None
    if ckpt_path is not None:
        resume = load_checkpoint(ckpt_path, map_location=setup.device, log=setup.log)
    if resume is not None:
        resume = _upgrade(resume)
        if setup.log is not None:
            step = (resume["trainer"].get("partial") or {}).get("step", 0)
            setup.log.info(
                "resuming %s epoch %d step %d from %s", resume["stage"], resume["epoch"] + 1, step, ckpt_path
            )
        setup.student.load_state_dict(resume["student"])
        if setup.distiller is not None and resume.get("distiller") is not None:
            setup.distiller.load_state_dict(resume["distiller"])
        if setup.objective is not None and resume.get("objective") is not None:
            setup.objective.load_state_dict(resume["objective"])
        torch.set_rng_state(resume["torch_rng"])
        if resume.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        if setup.workdir is not None and ranks.is_writer():
            _truncate_metrics(setup.workdir / "metrics.jsonl", resume["stage"], resume["epoch"])
    elif setup.workdir is not None and ranks.is_writer():
        (setup.workdir / "metrics.jsonl").unlink(missing_ok=True)
    if setup.workdir is not None and setup.dataset_augmenters:
        done = 0
        if resume is not None and resume["stage"] == "train":  # a begun epoch made its samples already
            done = resume["epoch"] + (1 if resume["trainer"].get("partial") else 0)
        restore_extra_samples(setup.workdir, setup.train_data, done)
    all_stages = stages(setup)
    names = [st.name for st in all_stages]
    first = names.index(resume["stage"]) if resume is not None else 0
    row: dict[str, Any] = {}
    for stage in all_stages[first:]:
        if setup.distiller is not None:
            setup.distiller.begin_stage(stage.name)
        stage.params = _params(setup, stage)
        hooks = _hooks(setup, stage, ckpt_path)
        last = _LastRow()
        trainer = Trainer(setup, stage, [*hooks, last])
        start = 0
        if resume is not None and resume["stage"] == stage.name:
            trainer.load_state_dict(resume["trainer"])
            start = resume["epoch"]
        yield from trainer.steps(start)
        row = last.row or row
        resume = None
    if ckpt_path is not None and ranks.is_writer():
        ckpt_path.unlink(missing_ok=True)
    return row


class _LastRow(Hook):
    name = "last_row"

    def __init__(self) -> None:
        self.row: dict[str, Any] = {}

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        self.row = row
