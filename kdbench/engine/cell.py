"""Running one cell: obtain the teacher (cached), build student and method, train, evaluate.

Everything a cell leaves is under ``cells/<id>/``: ``config.json``, ``log.txt``,
``metrics.jsonl`` (per epoch), ``checkpoint.pt`` while it runs, ``student.pt`` and finally
``result.json`` (atomic). Teachers live in ``teachers/<teacher id>.pt`` and are trained once,
under a file lock, by whichever worker needs them first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import platform
import random
import subprocess
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdbench import __version__, registry
from kdbench.engine.build import build_augmenter, build_dataset, build_model, resolve_device
from kdbench.engine.data import Batches
from kdbench.engine.metrics import classification_metrics
from kdbench.engine.train import Progress, TrainSetup, _save_atomic, predict_all, train
from kdbench.errors import KdbenchError
from kdbench.features import FeatureReader
from kdbench.methods.base import MethodContext
from kdbench.store import write_json_atomic

PROBE_SIZE = 256


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def environment() -> dict[str, Any]:
    """Versions and host facts recorded with every result."""
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except Exception:
        sha = None
    from kdbench import kernels

    return {
        "kdbench": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "git_sha": sha,
        "kernels": kernels.backend(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock, released by the OS if the holder dies (SIGKILL-safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"kdbench.cell.{path.parent.name}")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(h)
    return log


class _Data:
    """A dataset plugin's splits, batched."""

    def __init__(self, ref: dict, batch_size: int, eval_batch_size: int):
        self.ds = build_dataset(ref)
        self.train = Batches(self.ds.split("train"), batch_size)
        self.test = Batches(self.ds.split("test"), eval_batch_size)
        self.num_classes = self.ds.num_classes
        self.in_channels = self.ds.in_channels


def obtain_teacher(
    spec: dict, run_dir: Path, device: torch.device, data: _Data, progress: Progress | None = None
) -> nn.Module:
    """The trained teacher for ``spec``, from the cache or obtained now (once, under a lock)."""
    tdir = run_dir / "teachers"
    weights = tdir / f"{spec['id']}.pt"
    with file_lock(tdir / f"{spec['id']}.lock"):
        if not weights.exists():
            _make_teacher(spec, tdir, device, data, progress)
    model, _ = build_model(spec["model"], data.num_classes, data.in_channels)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        # the architecture's code changed under an unchanged plugin version
        raise KdbenchError(
            f"cached teacher {weights} no longer fits model {spec['label']!r} ({e}); "
            "delete it (and its folder) to train it again"
        ) from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _make_teacher(
    spec: dict, tdir: Path, device: torch.device, data: _Data, progress: Progress | None
) -> None:
    t0 = time.perf_counter()
    work = tdir / spec["id"]
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "config.json", spec)
    seed_everything(spec["seed"])
    model, taps = build_model(spec["model"], data.num_classes, data.in_channels)
    model.to(device)
    reader = FeatureReader(model, taps, ["logits"])
    source = registry.load("teachers", spec["source"]["name"])(**spec["source"]["params"])

    def recipe(m: nn.Module) -> dict:
        setup = TrainSetup(
            student=m,
            student_reader=reader,
            train_cfg=spec["train"],
            train_data=Batches(data.train.data, spec["train"]["batch_size"]),
            test_data=data.test,
            device=device,
            seed=spec["seed"],
            augment=build_augmenter(spec["augment"], data.train.data).__call__,
            workdir=work,
            progress=(lambda r: progress({**r, "stage": "teacher"})) if progress else None,
        )
        return train(setup)

    source.obtain(model, recipe)
    logits, y = predict_all(reader, data.test, device)
    reader.close()
    metrics = classification_metrics(logits, y)
    result = {"teacher": spec, "metrics": metrics, "wall_s": time.perf_counter() - t0, "env": environment()}
    write_json_atomic(work / "result.json", result)
    _save_atomic(model.state_dict(), tdir / f"{spec['id']}.pt")


def run_cell(cell: dict, run_dir: Path, progress: Progress | None = None, attempt: int = 1) -> dict:
    """Run one cell to completion and write its ``result.json``; returns the result dict.

    Failures are recorded (status "failed" with the traceback) rather than raised, so one
    broken cell never stops a sweep.
    """
    cdir = run_dir / "cells" / cell["id"]
    cdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cdir / "config.json", cell)
    log = _logger(cdir / "log.txt")
    log.info(
        "cell %s attempt %d: %s %s→%s seed %s",
        cell["id"],
        attempt,
        cell["method"]["label"],
        cell["teacher"]["label"],
        cell["student"]["label"],
        cell["seed"],
    )
    t0 = time.perf_counter()
    result: dict[str, Any] = {"cell": cell, "attempt": attempt, "env": environment()}
    try:
        result["metrics"], result["summary"] = _run(cell, run_dir, cdir, progress, log)
        result["status"] = "done"
    except KeyboardInterrupt:
        raise
    except Exception as e:
        log.error("failed:\n%s", traceback.format_exc())
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
    result["wall_s"] = time.perf_counter() - t0
    if result["status"] == "done":
        result["metrics"]["wall_s"] = result["wall_s"]
    write_json_atomic(cdir / "result.json", result)
    log.info("%s in %.1f s", result["status"], result["wall_s"])
    return result


def _run(
    cell: dict, run_dir: Path, cdir: Path, progress: Progress | None, log: logging.Logger
) -> tuple[dict, dict]:
    device = resolve_device(cell["train"]["device"])
    tr = cell["train"]
    data = _Data(cell["dataset"], tr["batch_size"], cell["eval"]["batch_size"])
    method_cls = registry.load("losses", cell["method"]["name"])

    teacher = tspec = None
    if cell["uses_teacher"]:
        teacher = obtain_teacher(cell["teacher"], run_dir, device, data, progress)
        _, tspec = build_model(cell["teacher"]["model"], data.num_classes, data.in_channels)

    seed_everything(cell["seed"])
    student, sspec = build_model(cell["student"], data.num_classes, data.in_channels)
    student.to(device)

    # probe both models once, reading every tap they expose: feature shapes for the method,
    # probe features for methods fitted before training (CKA grouping)
    probe_x = torch.cat([x for x, _, _ in _take(data.train, PROBE_SIZE)])[:PROBE_SIZE].to(device)
    s_probe = _probe(student, sspec, probe_x)
    t_probe = _probe(teacher, tspec, probe_x) if teacher is not None else None
    classifier = teacher.get_submodule(tspec.classifier) if teacher is not None and tspec.classifier else None
    ctx = MethodContext(
        num_classes=data.num_classes,
        num_train=len(data.train),
        epochs=tr["epochs"],
        batch_size=tr["batch_size"],
        student_shapes=s_probe.shapes(),
        teacher_shapes=t_probe.shapes() if t_probe else {},
        student_probe=s_probe,
        teacher_probe=t_probe,
        teacher_classifier=classifier,
        train_targets=data.train.targets().to(device),
        device=device,
    )
    distiller = method_cls(ctx, **cell["method"]["params"]).to(device)
    # taps are read from the built method: a method's mode may change what it reads
    student_reader = FeatureReader(student, sspec, distiller.taps.student or ("logits",))
    teacher_reader = None
    if teacher is not None:
        teacher_reader = FeatureReader(teacher, tspec, distiller.taps.teacher or ("logits",))

    views = {name: build_augmenter(ref, data.train.data).__call__ for name, ref in cell["views"].items()}
    setup = TrainSetup(
        student=student,
        student_reader=student_reader,
        train_cfg=tr,
        train_data=data.train,
        test_data=data.test,
        device=device,
        seed=cell["seed"],
        augment=build_augmenter(cell["augment"], data.train.data).__call__,
        ece_bins=cell["eval"]["ece_bins"],
        distiller=distiller,
        teacher_reader=teacher_reader,
        views=views,
        weights=cell["method"]["weights"],
        workdir=cdir,
        progress=progress,
    )
    t_train = time.perf_counter()
    train(setup)
    train_s = time.perf_counter() - t_train
    teacher_logits = None
    if teacher_reader is not None:
        teacher_logits, _ = predict_all(teacher_reader, data.test, device)
    from kdbench.engine.train import evaluate

    metrics = evaluate(setup, teacher_logits)
    metrics["train_s"] = train_s
    torch.save(student.state_dict(), cdir / "student.pt")
    summary = distiller.summary()
    log.info("metrics %s", json.dumps(metrics))
    student_reader.close()
    if teacher_reader:
        teacher_reader.close()
    return metrics, summary


def _probe(model: nn.Module, spec, x: torch.Tensor):
    """Detached features of every tap ``spec`` provides, in eval mode."""
    wanted = (
        ["logits"]
        + (["stages"] if spec.stages else [])
        + (["preact"] if any(spec.preact) else [])
        + (["pooled"] if spec.classifier else [])
    )
    reader = FeatureReader(model, spec, wanted)
    was = model.training
    model.eval()
    with torch.no_grad():
        feats = reader.read(x).detach()
    model.train(was)
    reader.close()
    return feats


def _take(batches: Batches, n: int):
    got = 0
    for x, y, i in batches.iterate(None, drop_singletons=False):
        yield x, y, i
        got += len(x)
        if got >= n:
            return
