"""The training loop shared by teachers (plain CE) and students (a Distiller).

The engine knows no method by name: it asks the method which taps it reads, runs the
teacher's forward as its own step (eval mode, ``no_grad``), weights the terms the method
returns, and checkpoints after every epoch so a killed run resumes where it stopped with
the same numbers (model, optimiser, scheduler and every RNG state are saved together).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.engine.data import Batches
from kdbench.engine.metrics import classification_metrics
from kdbench.features import FeatureReader, Features
from kdbench.methods.base import Batch, Distiller

Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainSetup:
    """What one training run needs; ``distiller`` None means plain cross-entropy."""

    student: nn.Module
    student_reader: FeatureReader
    train_cfg: dict[str, Any]
    train_data: Batches
    test_data: Batches
    device: torch.device
    seed: int
    augment: Callable[[Tensor, torch.Generator], Tensor]
    ece_bins: int = 15
    eval_batch_size: int = 512
    distiller: Distiller | None = None
    teacher_reader: FeatureReader | None = None
    views: dict[str, Callable[[Tensor, torch.Generator], Tensor]] | None = None
    weights: dict[str, float] | None = None
    workdir: Path | None = None  # checkpoint.pt and metrics.jsonl live here
    progress: Progress | None = None


def make_optimizer(params: list[nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def lr_factor(cfg: dict[str, Any], epoch: int) -> float:
    """Multiplier of the base lr at ``epoch`` (0-based); milestones < 1 are fractions of epochs."""
    epochs = max(cfg["epochs"], 1)
    if cfg.get("warmup_epochs", 0) and epoch < cfg["warmup_epochs"]:
        return (epoch + 1) / cfg["warmup_epochs"]
    if cfg["schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if cfg["schedule"] == "step":
        marks = [m * epochs if m < 1 else m for m in cfg["milestones"]]
        return cfg["gamma"] ** sum(epoch >= m for m in marks)
    return 1.0


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_metrics(path: Path | None, row: dict[str, Any]) -> None:
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


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


@torch.no_grad()
def predict_all(
    reader: FeatureReader,
    data: Batches,
    device: torch.device,
    head: Callable[[Features], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits (through ``head`` if given) and labels of a whole split, in order."""
    was = reader.model.training
    reader.model.eval()
    outs, ys = [], []
    for x, y, _ in data.iterate(None, drop_singletons=False):
        f = reader.read(x.to(device, non_blocking=True))
        outs.append((head(f) if head else f.logits).float().cpu())
        ys.append(y)
    reader.model.train(was)
    return torch.cat(outs), torch.cat(ys)


def evaluate(setup: TrainSetup, teacher_logits: Tensor | None = None) -> dict[str, float]:
    head = setup.distiller.predict if setup.distiller is not None else None
    if setup.distiller is not None:
        setup.distiller.eval()
    logits, y = predict_all(setup.student_reader, setup.test_data, setup.device, head)
    if setup.distiller is not None:
        setup.distiller.train()
    return classification_metrics(logits, y, setup.ece_bins, teacher_logits)


def _stage(
    setup: TrainSetup,
    epochs: int,
    params: list[nn.Parameter],
    loss_fn: Callable,
    tag: str,
    start_epoch: int,
    ckpt: Path | None,
    state_extra: dict,
) -> None:
    """Run ``epochs`` epochs of ``loss_fn``; resumable from ``ckpt``."""
    cfg = {**setup.train_cfg, "epochs": epochs}
    if tag == "init" and cfg.get("init_lr"):
        cfg["lr"] = cfg["init_lr"]
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg, e))
    data_gen = torch.Generator().manual_seed(setup.seed * 1000003 + (1 if tag == "init" else 0))
    aug_gen = torch.Generator(device="cpu").manual_seed(setup.seed * 7919 + 17)
    if state_extra.get("opt") is not None:
        opt.load_state_dict(state_extra["opt"])
        sched.load_state_dict(state_extra["sched"])
        data_gen.set_state(state_extra["data_gen"])
        aug_gen.set_state(state_extra["aug_gen"])
    metrics_path = setup.workdir / "metrics.jsonl" if setup.workdir else None
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        setup.student.train()
        if setup.distiller is not None:
            setup.distiller.train()
        totals: dict[str, float] = {}
        n_batches = 0
        for step, (x, y, idx) in enumerate(setup.train_data.iterate(data_gen)):
            x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
            terms = loss_fn(x, y, idx.to(setup.device), epoch, epochs, step, aug_gen)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{tag} loss is {float(loss)} at epoch {epoch + 1} step {step}; "
                    "lower the lr or the method's weights"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
            n_batches += 1
        sched.step()
        row = {
            "stage": tag,
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_s": round(time.perf_counter() - t0, 3),
            **{f"loss_{k}": v / max(n_batches, 1) for k, v in totals.items()},
        }
        if tag == "train":
            row.update({f"test_{k}": v for k, v in evaluate(setup).items()})
        _append_metrics(metrics_path, row)
        every = setup.train_cfg.get("checkpoint_every", 1)  # 0: never
        if ckpt is not None and every and (epoch + 1) % every == 0 and epoch + 1 < epochs:
            _save_atomic(
                {
                    "tag": tag,
                    "epoch": epoch + 1,
                    "student": setup.student.state_dict(),
                    "distiller": setup.distiller.state_dict() if setup.distiller else None,
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "data_gen": data_gen.get_state(),
                    "aug_gen": aug_gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                },
                ckpt,
            )
        if setup.progress:
            setup.progress({**row, "stage": tag, "epoch": epoch + 1, "epochs": epochs})
        state_extra.clear()


def _weighted(terms: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    return {k: weights.get(k, 1.0) * v for k, v in terms.items() if weights.get(k, 1.0) != 0.0}


def train(setup: TrainSetup) -> dict[str, float]:
    """Train (resuming from ``workdir/checkpoint.pt`` when present) and return test metrics."""
    ckpt = setup.workdir / "checkpoint.pt" if setup.workdir else None
    resume: dict[str, Any] = {}
    if ckpt is not None and ckpt.exists():
        resume = torch.load(ckpt, map_location=setup.device, weights_only=False)
        setup.student.load_state_dict(resume["student"])
        if setup.distiller is not None and resume.get("distiller") is not None:
            setup.distiller.load_state_dict(resume["distiller"])
        torch.set_rng_state(resume["torch_rng"])
        if setup.workdir is not None:
            _truncate_metrics(setup.workdir / "metrics.jsonl", resume["tag"], resume["epoch"])
    elif setup.workdir is not None:
        (setup.workdir / "metrics.jsonl").unlink(missing_ok=True)
    d = setup.distiller
    weights = {"ce": 1.0, **(d.default_weights if d else {}), **(setup.weights or {})}

    def student_terms(x, y, idx, epoch, epochs, step, gen):
        xs = setup.augment(x, gen)
        s = setup.student_reader.read(xs)
        if d is None:
            return {"ce": F.cross_entropy(s.logits, y)}
        t = _teacher_features(setup, xs)
        views = {}
        for name in d.views:
            xv = setup.views[name](x, gen) if setup.views and name in setup.views else xs
            views[name] = (setup.student_reader.read(xv), _teacher_features(setup, xv))
        batch = Batch(x=xs, y=y, index=idx, epoch=epoch, epochs=epochs, step=step, views=views)
        terms = dict(d(s, t, batch))
        if weights.get("ce", 0.0) != 0.0:
            terms["ce"] = F.cross_entropy(d.predict(s), y)
        return _weighted(terms, weights)

    if d is not None and d.init_epochs > 0:
        done_init = resume.get("tag") == "train"
        if not done_init:

            def init_terms(x, y, idx, epoch, epochs, step, gen):
                xs = setup.augment(x, gen)
                s = setup.student_reader.read(xs)
                t = _teacher_features(setup, xs)
                batch = Batch(x=xs, y=y, index=idx, epoch=epoch, epochs=epochs, step=step)
                return _weighted(dict(d.init_loss(s, t, batch)), weights)

            params = _unique(d.init_parameters(setup.student))
            start = resume.get("epoch", 0) if resume.get("tag") == "init" else 0
            _stage(
                setup,
                d.init_epochs,
                params,
                init_terms,
                "init",
                start,
                ckpt,
                resume if resume.get("tag") == "init" else {},
            )
            resume = {}
    params = _unique(list(setup.student.parameters()) + (list(d.parameters()) if d else []))
    start = resume.get("epoch", 0) if resume.get("tag") == "train" else 0
    _stage(
        setup,
        setup.train_cfg["epochs"],
        params,
        student_terms,
        "train",
        start,
        ckpt,
        resume if resume.get("tag") == "train" else {},
    )
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return evaluate(setup)


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
