"""Running one cell: obtain the teacher (cached), build student and method, train, evaluate.

Everything a cell leaves is under ``cells/<id>/``: ``config.json``, ``log.txt``,
``metrics.jsonl`` (per epoch), ``checkpoint.pt`` while it runs, ``extra/`` (samples a
dataset-level augmenter generated), ``student.pt`` and finally ``result.json`` (atomic).
Teachers live in ``teachers/<teacher id>.pt`` and are trained once, under a file lock, by
whichever worker needs them first; their logits on evaluation sets are cached next to them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import subprocess
import time
import traceback
from collections import OrderedDict
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdbench import __version__, registry
from kdbench.artifacts import (
    DiskError,
    file_lock,
    load_checked,
    save_atomic,
    save_checked,
    sidecar,
    write_json_atomic,
)
from kdbench.cells import Cell, CellResult, PluginKey, TeacherSpec
from kdbench.engine import evaluation as ev
from kdbench.engine import ranks, softlabels, views
from kdbench.engine.build import build_augmenter, build_dataset, build_model, resolve_device
from kdbench.engine.data import Batches, holdout
from kdbench.engine.train import Progress, StepPos, TrainSetup, clean, drain, train, train_steps
from kdbench.engine.train import time_limit as _time_limit
from kdbench.errors import ConfigError, KdbenchError
from kdbench.features import FeatureReader, TapSpec, probe_features
from kdbench.loggers import ARTIFACTS as LOGGED_FILES
from kdbench.loggers import CellLoggers, RunInfo, cell_loggers
from kdbench.methods.base import Distiller, MethodContext

PROBE_SIZE = 256
#: datasets kept loaded per process (a worker running many cells loads each once)
DATASET_CACHE_SIZE = 4


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_sha() -> str | None:
    """The commit of the checkout kdbench runs from (None: not a git checkout, or no git)."""
    try:
        return (
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
        return None


def environment() -> dict[str, Any]:
    """Versions and host facts recorded with every result (what the numbers depend on)."""
    sha = git_sha()
    from kdbench import kernels

    return {
        "kdbench": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "pid": os.getpid(),  # which process ran it (a lockstep group: one process)
        "git_sha": sha,
        "kernels": kernels.backend(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **numerics(),
        **ranks.describe(),  # {"ddp": {world, backend, device}} inside a DDP cell
    }


#: environment variables that change which floating-point code paths run
NUMERICS_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "KDBENCH_KERNELS",
    "CUBLAS_WORKSPACE_CONFIG",
)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def numerics() -> dict[str, Any]:
    """What floating-point results depend on besides code, data and seed.

    Measured (kd cell, mnist5k, 2 epochs): the same environment gives bit-identical numbers;
    changing the intra-op thread count, ATen's CPU capability (AVX2 vs default), oneDNN's ISA,
    MKL's code path (MKL_CBWR) or the kdbench kernel backend each changes the result.
    """
    cfg = torch.__config__.show()
    blas = next(
        (ln.split("=", 1)[1] for ln in cfg.replace(",", "\n").splitlines() if "BLAS_INFO=" in ln), None
    )
    out: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
        "interop_threads": torch.get_num_interop_threads(),
        "blas": blas,
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "machine": platform.machine(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
    }
    if torch.cuda.is_available():
        out["cuda_version"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


@contextmanager
def cell_logger(path: Path) -> Iterator[logging.Logger]:
    """The cell's ``log.txt`` logger; its file is closed on exit (no descriptor per cell)."""
    log = logging.getLogger(f"kdbench.cell.{path.parent.name}")
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.propagate = False
    log.setLevel(logging.INFO)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(h)
    try:
        yield log
    finally:
        log.removeHandler(h)
        h.close()


# ------------------------------------------------------------------------------------ data

_DATASETS: OrderedDict[str, Any] = OrderedDict()


def _plain(ref: PluginKey | dict[str, Any]) -> dict[str, Any]:
    """A plugin reference as the builders take it: ``{"name", "params"}``."""
    if isinstance(ref, dict):
        return {"name": ref["name"], "params": dict(ref.get("params") or {})}
    return {"name": ref.name, "params": dict(ref.params)}


def _ref_key(ref: PluginKey | dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_plain(ref), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_key(ref: PluginKey | dict[str, Any]) -> str:
    """Identifies the data itself (plugin, params and file fingerprint): cached teacher logits use it."""
    fp = ref.get("fingerprint") if isinstance(ref, dict) else getattr(ref, "fingerprint", None)
    return hashlib.sha256(
        json.dumps({**_plain(ref), "fingerprint": fp}, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def load_dataset(ref: PluginKey | dict[str, Any]) -> Any:
    """The dataset plugin for ``ref``, built once per process (least recently used dropped)."""
    key = _ref_key(ref)
    if key in _DATASETS:
        _DATASETS.move_to_end(key)
        return _DATASETS[key]
    ds = build_dataset(_plain(ref))
    _DATASETS[key] = ds
    while len(_DATASETS) > DATASET_CACHE_SIZE:
        _DATASETS.popitem(last=False)
    return ds


@dataclass
class CellData:
    """A dataset's training split (less a validation hold-out) and its evaluation sets."""

    ds: Any
    key: str  # identifies the data in cache keys
    train: Batches
    val: Batches | None
    test: Batches
    eval_batch_size: int
    val_fraction: float = 0.0
    extra: dict[str, Batches] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.ds.num_classes

    @property
    def in_channels(self) -> int:
        return self.ds.in_channels

    def eval_sets(self, cell: Any = None, cache_dir: Path | None = None) -> dict[str, ev.EvalSet]:
        """test, val (when held out or shipped), the dataset's extra sets, provider sets."""
        sets = {"test": ev.EvalSet("test", self.test, key=f"{self.key}-test", per_epoch=True)}
        if self.val is not None:
            sets["val"] = ev.EvalSet(
                "val", self.val, key=f"{self.key}-val{self.val_fraction:g}", per_epoch=True
            )
        for name, b in self.extra.items():
            sets[name] = ev.EvalSet(name, b, key=f"{self.key}-{name}")
        ev.load_extensions()
        for provider in ev.SET_PROVIDERS:
            sets.update(provider(self.ds, cell, cache_dir if cache_dir is not None else Path(".")))
        return sets

    def context(self, ece_bins: int) -> ev.EvalContext:
        """What metrics know of the training split: its own samples only, never the samples a
        dataset-level augmenter (ConfiG) adds to it later (a copy, taken now)."""
        n = self.train.n_base
        return ev.EvalContext(
            ece_bins=ece_bins,
            group_info=self.ds.group_info(),
            train_meta={k: v[:n] for k, v in self.train.meta.items()},
            train_targets=self.train.targets()[:n],
        )


def cell_data(
    ref: PluginKey | dict[str, Any], batch_size: int, eval_batch_size: int, val_fraction: float = 0.0
) -> CellData:
    """Batches of a dataset's splits; ``val_fraction`` > 0 holds out a stratified part of train
    (or uses the dataset's own ``val`` split when it ships one)."""
    ds = load_dataset(ref)
    train_split = ds.split("train")
    train_meta = ds.meta("train")
    val = None
    if val_fraction and "val" in ds.splits:
        train = Batches(train_split, batch_size, meta=train_meta)
        val = Batches(ds.split("val"), eval_batch_size, meta=ds.meta("val"))
    elif val_fraction:
        full = Batches(train_split, batch_size)
        keep, held = holdout(full.targets(), val_fraction)
        train = Batches(train_split, batch_size, indices=keep, meta=train_meta)
        val = Batches(train_split, eval_batch_size, indices=held, meta=train_meta)
    else:
        train = Batches(train_split, batch_size, meta=train_meta)
    test = Batches(ds.split("test"), eval_batch_size, meta=ds.meta("test"))
    extra = {n: Batches(d, eval_batch_size, meta=ds.meta(n)) for n, d in ds.eval_splits().items()}
    return CellData(ds, _data_key(ref), train, val, test, eval_batch_size, float(val_fraction or 0.0), extra)


# --------------------------------------------------------------------------------- teacher


def obtain_teacher(
    spec: TeacherSpec,
    run_dir: Path,
    device: torch.device,
    eval_batch_size: int = 512,
    ece_bins: int = 15,
    progress: Progress | None = None,
    cache: str = "teachers",
) -> tuple[nn.Module, TapSpec]:
    """The trained teacher for ``spec`` and its taps, from the cache or obtained now (once, under a lock).

    The teacher trains on its own dataset spec (``spec.dataset``, which may differ from the
    student's) less the same validation hold-out as its cells (``spec.val_fraction``).
    ``cache`` is the run directory's folder it lives in (JTT's stage-1 models: "jtt").
    """
    tdir = run_dir / cache
    weights = tdir / f"{spec.id}.pt"
    data = cell_data(spec.dataset, spec.train.batch_size, eval_batch_size, spec.val_fraction)
    with file_lock(tdir / f"{spec.id}.lock"):
        # weights without their checksum: a crash between the two writes; train it again
        if not (weights.exists() and sidecar(weights).exists()):
            _make_teacher(spec, tdir, device, data, ece_bins, progress)
    model, taps = build_model(_plain(spec.model), data.num_classes, data.in_channels)
    # verified against the SHA-256 recorded when it was saved: a changed file fails its cells
    state = load_checked(weights, rebuild_hint=f"delete it (and {tdir / spec.id}/) to train it again")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        # the architecture's code changed under an unchanged plugin version
        raise KdbenchError(
            f"cached teacher {weights} no longer fits model {spec.label!r} ({e}); "
            "delete it (and its folder) to train it again"
        ) from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, taps


def prepare_teacher(cell: Cell, run_dir: Path) -> None:
    """Obtain and cache the teacher ``cell`` needs, as ``run_cell`` would (a separate teacher job
    for executors that run a sweep's teachers before the cells depending on them)."""
    if not cell.uses_teacher:
        return
    device = resolve_device(cell.train.device)
    obtain_teacher(cell.teacher, Path(run_dir), device, cell.eval.batch_size, cell.eval.ece_bins)


def prepare_softlabels(cell: Cell, run_dir: Path) -> Path | None:
    """Obtain the teacher and build the soft-label bank ``cell`` replays (``teacher_outputs: replay``),
    as ``run_cell`` would; the bank's directory, or None when the cell replays nothing."""
    if not cell.uses_teacher or not softlabels.is_replay(cell.train.teacher_outputs):
        return None
    parts = _build(cell, Path(run_dir), None, None)
    try:
        setup = _setup(cell, parts, None, None, logging.getLogger("kdbench"))  # type: ignore[arg-type]
        return softlabels.obtain(cell, setup, Path(run_dir), setup.log).dir
    finally:
        parts.close()


def _teacher_loss(spec: TeacherSpec, data: CellData, device: torch.device):
    """The teacher recipe's own loss (``teacher_train.method``, e.g. the tolerant teacher's term),
    built like a teacher-free method, with its weights; (None, CE only) for plain cross-entropy."""
    method = spec.train.method
    if not method:
        return None, {"ce": 1.0}
    cls = registry.load("losses", method["name"])
    params = dict(method.get("params") or {})
    ctx = MethodContext(
        num_classes=data.num_classes,
        num_train=len(data.train),
        epochs=spec.train.epochs,
        batch_size=spec.train.batch_size,
        train_targets=data.train.targets().to(device),
        device=device,
    )
    return cls(ctx, **params).to(device), {"ce": 1.0, **cls.weights_for(**params)}


def _make_teacher(
    spec: TeacherSpec,
    tdir: Path,
    device: torch.device,
    data: CellData,
    ece_bins: int,
    progress: Progress | None,
) -> None:
    t0 = time.perf_counter()
    work = tdir / spec.id
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "config.json", spec.to_dict())
    seed_everything(spec.seed)
    model, taps = build_model(_plain(spec.model), data.num_classes, data.in_channels)
    model.to(device)
    reader = FeatureReader(model, taps, ["logits"])
    source = registry.load("teachers", spec.source.name)(**spec.source.params)

    def recipe(m: nn.Module) -> dict:
        distiller, weights = _teacher_loss(spec, data, device)
        setup = TrainSetup(
            student=m,
            student_reader=reader,
            recipe=spec.train,
            train_data=data.train,
            device=device,
            seed=spec.seed,
            augment=build_augmenter(_plain(spec.augment), data.train.data).__call__,
            distiller=distiller,
            weights=weights,
            workdir=work,
            progress=(lambda r: progress({**r, "stage": "teacher"})) if progress else None,
        )
        # a teacher is shared by cells and grids: it reports to the default loggers (its events
        # in <teacher dir>/tb), not to a grid's runs
        run = RunInfo(
            spec.id, f"teacher {spec.id}", tdir.parent.name, work, tdir.parent, config=spec.to_dict()
        )
        with cell_loggers(None, run) as tracking:
            row = train(replace(setup, loggers=tracking))
            tracking.finish("done")
        return row

    source.obtain(model, recipe)
    model.eval()
    sets = data.eval_sets(None, tdir.parent / "cache")
    per_set = ev.evaluate(lambda x: reader.read(x).logits, sets, device, data.context(ece_bins))
    metrics = ev.final_metrics(per_set)
    hook_view = dict(sets=sets, train=data.train, val=data.val, device=device, ctx=data.context(ece_bins))
    metrics.update(
        ev.model_hooks(ev.TrainedModel("teacher", model, taps, lambda x: reader.read(x).logits, **hook_view))
    )
    reader.close()
    result = {
        "teacher": spec.to_dict(),
        "metrics": metrics,
        "wall_s": time.perf_counter() - t0,
        "env": environment(),
    }
    write_json_atomic(work / "result.json", result)
    save_checked(model.state_dict(), tdir / f"{spec.id}.pt")


# ------------------------------------------------------------------------------------ cell


def run_cell(
    cell: Cell,
    run_dir: Path,
    progress: Progress | None = None,
    attempt: int = 1,
    time_limit: float | None = None,
    loggers: Sequence[PluginKey] | None = None,
) -> CellResult:
    """Run one cell in this process (or as this process's DDP rank) and write its ``result.json``.

    Failures are recorded (status "failed" with the traceback in ``log.txt``) rather than
    raised, so one broken cell never stops a sweep. ``time_limit`` (seconds of wall time): past
    it the cell checkpoints at its next step and fails, ``retryable``. ``loggers``: where its
    training is reported (the grid's ``loggers``; None: the defaults, kdbench/loggers).
    """
    with _time_limit(time_limit):
        return drain(run_cell_steps(cell, run_dir, progress, attempt, loggers=loggers))


def run_cell_steps(
    cell: Cell,
    run_dir: Path,
    progress: Progress | None = None,
    attempt: int = 1,
    teachers: Any = None,
    loggers: Sequence[PluginKey] | None = None,
) -> Generator[StepPos, None, CellResult]:
    """:func:`run_cell` as a generator yielding ``(stage, epoch, step)`` before each training
    step; ``teachers`` (a ``kdbench.engine.lockstep.SharedTeachers``) lends the teacher. The
    cell's loggers run on the writing rank only: one run per cell, in a lockstep group too."""
    if ranks.world_size(cell.train) > 1 and ranks.current() is None:
        raise KdbenchError(
            f"cell {cell.id} is a DDP cell (gpus_per_cell x nodes > 1): run it through "
            "kdbench.engine.run.run_job, which starts its ranks"
        )
    cdir = Path(run_dir) / "cells" / cell.id
    cdir.mkdir(parents=True, exist_ok=True)
    writer = ranks.is_writer()  # DDP: only rank 0 writes the cell's files
    if writer:
        write_json_atomic(cdir / "config.json", cell.to_dict())
        (cdir / "result.json").unlink(missing_ok=True)  # an earlier attempt's outcome is stale now
    env = environment()
    run_info = RunInfo.of_cell(cell, cdir) if writer else None
    with (
        cell_logger(cdir / "log.txt" if writer else Path(os.devnull)) as log,
        cell_loggers(loggers, run_info, log) as tracking,
    ):
        log.info("cell %s attempt %d: %s", cell.id, attempt, cell.describe)
        t0 = time.perf_counter()
        try:
            env["views"] = views.describe(cell)
            metrics, summary = yield from _run(cell, Path(run_dir), cdir, progress, log, teachers, tracking)
            wall = time.perf_counter() - t0
            result = CellResult(
                cell=cell, status="done", metrics={**metrics, "wall_s": wall}, summary=summary,
                env=env, wall_s=wall, attempt=attempt,
            )  # fmt: skip
        except (KeyboardInterrupt, DiskError):
            raise  # a full disk stops the sweep with one line instead of failing every cell
        except Exception as e:
            log.error("failed:\n%s", traceback.format_exc())
            result = CellResult.failed(
                cell, attempt, f"{type(e).__name__}: {e}", bool(getattr(e, "retryable", False)),
                time.perf_counter() - t0,
            ).model_copy(update={"env": env})  # fmt: skip
        if tracking.problems:  # the driver prints each distinct problem once for the sweep
            result = result.model_copy(update={"env": {**result.env, "logger_problems": tracking.problems}})
        if writer:
            write_json_atomic(cdir / "result.json", result)
        log.info("%s in %.1f s", result.status, result.wall_s)
        tracking.finish(result.status, result.metrics, [cdir / name for name in LOGGED_FILES])
    return result


@dataclass
class _Parts:
    """A cell set up to train: data, models, readers, method and the trainer's setup."""

    device: torch.device
    data: CellData
    student: nn.Module
    sspec: TapSpec
    distiller: Distiller
    student_reader: FeatureReader
    teacher_reader: Any
    sets: dict[str, ev.EvalSet]
    ctx: ev.EvalContext
    setup: TrainSetup | None = None
    #: what the cell's recipe adds to its summary (JTT's error set)
    notes: dict[str, Any] = field(default_factory=dict)

    def student_logits(self, x: Tensor) -> Tensor:
        return self.distiller.predict(self.student_reader.read(x))

    def epoch_eval(self) -> dict[str, float]:
        with _eval_mode(self.student, self.distiller):
            per = ev.evaluate(self.student_logits, _per_epoch(self.sets), self.device, self.ctx, cheap=True)
        return ev.epoch_metrics(per)

    def close(self) -> None:
        self.student_reader.close()
        if self.teacher_reader is not None:
            self.teacher_reader.close()


def _run(
    cell: Cell,
    run_dir: Path,
    cdir: Path,
    progress: Progress | None,
    log: logging.Logger,
    teachers: Any,
    tracking: CellLoggers | None = None,
) -> Generator[StepPos, None, tuple[dict, dict]]:
    parts = _build(cell, run_dir, teachers, progress)
    parts.setup = replace(_setup(cell, parts, cdir, progress, log), loggers=tracking)
    if parts.teacher_reader is not None and softlabels.is_replay(cell.train.teacher_outputs):
        parts.setup.replay = softlabels.obtain(cell, parts.setup, run_dir, log)  # built once, under a lock
    t_train = time.perf_counter()
    yield from train_steps(parts.setup)
    train_s = time.perf_counter() - t_train
    if not ranks.is_writer():
        return {}, {}  # DDP: rank 0 evaluates and saves the student
    t_eval = time.perf_counter()
    metrics = _evaluate(cell, parts, run_dir)
    metrics["train_s"] = train_s
    metrics["eval_s"] = time.perf_counter() - t_eval
    save_atomic(parts.student.state_dict(), cdir / "student.pt")
    log.info("metrics %s", json.dumps(metrics))
    parts.close()
    summary = {**parts.distiller.summary(), **parts.notes}
    if parts.setup.objective is not None:  # the group weights it ended with
        summary["objective_q"] = [round(float(v), 6) for v in parts.setup.objective.q]
    return metrics, summary


def _build(cell: Cell, run_dir: Path, teachers: Any, progress: Progress | None) -> _Parts:
    """Data, teacher (lent by ``teachers`` in a lockstep group), student and method of ``cell``."""
    tr, evc = cell.train, cell.eval
    device = resolve_device(tr.device)
    data = cell_data(cell.dataset, tr.batch_size, evc.batch_size, evc.val_fraction)
    method_cls: type[Distiller] = registry.load("losses", cell.method.name)
    params = dict(cell.method.params)
    jtt = method_train(cell, method_cls).jtt
    notes = {}
    if jtt is not None:  # JTT: stage 1 (cached like a teacher), its error set upsampled in data.train
        from kdbench.robustness.jtt import upsample

        log = logging.getLogger(f"kdbench.cell.{cell.id}")
        notes["jtt"] = upsample(cell, jtt, data.train, run_dir, device, log, obtain_teacher=obtain_teacher)
    teacher = tspec = None
    if cell.uses_teacher:
        get = teachers.obtain if teachers is not None else obtain_teacher
        teacher, tspec = get(cell.teacher, run_dir, device, evc.batch_size, evc.ece_bins, progress)
    seed_everything(cell.seed)
    student, sspec = build_model(_plain(cell.student), data.num_classes, data.in_channels)
    # DDP with sync_bn: BatchNorm layers replaced before any hook is registered on them
    student = ranks.prepare(student.to(device), tr.sync_bn)
    # probe both models once, reading every tap they expose: feature shapes for the method,
    # probe features for methods fitted before training (CKA grouping)
    probe_x = torch.cat([x for x, _, _ in _take(data.train, PROBE_SIZE)])[:PROBE_SIZE].to(device)
    probe = teachers.probe if teachers is not None else probe_features  # a lockstep group probes once
    s_probe = probe(student, sspec, probe_x)
    t_probe = probe(teacher, tspec, probe_x) if teacher is not None else None
    ctx = MethodContext(
        num_classes=data.num_classes,
        num_train=len(data.train),
        epochs=tr.epochs,
        batch_size=tr.batch_size,
        student_shapes=s_probe.shapes(),
        teacher_shapes=t_probe.shapes() if t_probe else {},
        student_probe=s_probe,
        teacher_probe=t_probe,
        teacher_classifier=_classifier(teacher, tspec),
        student_classifier=_classifier(student, sspec),
        train_targets=data.train.targets().to(device),
        device=device,
    )  # fmt: skip
    distiller = method_cls(ctx, **params).to(device)
    taps = method_cls.taps_for(**params)
    teacher_reader = None
    if teacher is not None:
        new_reader = teachers.reader if teachers is not None else FeatureReader
        teacher_reader = new_reader(teacher, tspec, taps.teacher or ("logits",))
    return _Parts(
        device, data, student, sspec, distiller, FeatureReader(student, sspec, taps.student or ("logits",)),
        teacher_reader, data.eval_sets(cell, run_dir / "cache"), data.context(evc.ece_bins), notes=notes,
    )  # fmt: skip


def method_train(cell: Cell, method_cls: Any) -> Any:
    """The cell's train recipe with the fields its method sets (``train_for(**params)``: the
    ``groupdro`` method's objective, ``jtt``'s setting); a conflicting grid value is an error."""
    implied = getattr(method_cls, "train_for", None)
    if implied is None:
        return cell.train
    fields = implied(**cell.method.params)
    for k, v in fields.items():
        own = getattr(cell.train, k)
        if own is not None and own != v:
            raise ConfigError(
                f"method {cell.method.name} sets train.{k} itself ({v}); the grid's {own} contradicts "
                f"it: remove train.{k} from this row or use {cell.method.name}'s parameters"
            )
    return cell.train.model_copy(update=fields)


def _classifier(teacher: nn.Module | None, tspec: TapSpec | None) -> nn.Module | None:
    return teacher.get_submodule(tspec.classifier) if teacher is not None and tspec.classifier else None


def _augmenter(ref: Any, data: CellData) -> Any:
    return build_augmenter(_plain({"name": ref} if isinstance(ref, str) else ref), data.train.data)


def _setup(
    cell: Cell, parts: _Parts, cdir: Path, progress: Progress | None, log: logging.Logger
) -> TrainSetup:
    """The trainer's setup: views (kdbench/engine/views.py), loss weights, hooks' inputs."""
    method_cls = type(parts.distiller)
    data, params = parts.data, dict(cell.method.params)
    base = _augmenter(cell.augment, data)
    extra = views.student_view(cell, method_cls)
    student_aug = base if extra is None else _augmenter(extra, data)
    stacked = extra is not None and cell.augment.name != "none"
    dataset_augs = _dataset_augmenters(base if stacked else student_aug)
    tv = views.teacher_view(cell, method_cls)
    return TrainSetup(
        student=parts.student,
        student_reader=parts.student_reader,
        recipe=method_train(cell, method_cls),
        train_data=data.train,
        device=parts.device,
        seed=cell.seed,
        augment=(lambda x, g: x) if student_aug in dataset_augs else student_aug.__call__,
        base_augment=base.__call__ if stacked and base not in dataset_augs else None,
        distiller=parts.distiller,
        teacher_reader=parts.teacher_reader,
        teacher_augment=None
        if tv == "student"
        else clean
        if tv == "clean"
        else _augmenter(tv, data).__call__,
        views={name: _augmenter(ref, data).__call__ for name, ref in cell.views.items()},
        weights={"ce": 1.0, **method_cls.weights_for(**params), **cell.method.weights},
        workdir=cdir,
        progress=progress,
        epoch_eval=parts.epoch_eval,
        eval_every=cell.eval.every,
        dataset_augmenters=dataset_augs,
        log=log,
    )


def _teacher_augment(tv: Any, data: CellData) -> Any:
    """None (the student's batch), :func:`clean` or the teacher's own augmenter."""
    return None if tv == "student" else clean if tv == "clean" else _augmenter(tv, data).__call__


def _dataset_augmenters(student_aug: Any) -> list[Any]:
    """The dataset-level augmenter among the student's (ConfiG as ``train.augment``), if any."""
    if not getattr(student_aug, "dataset_level", False):
        return []
    if not callable(getattr(student_aug, "on_epoch_start", None)):
        raise ConfigError(f"augmenter {type(student_aug).__name__} is not dataset-level (no on_epoch_start)")
    return [student_aug]


def _evaluate(cell: Cell, parts: _Parts, run_dir: Path) -> dict[str, float]:
    """Every metric of the trained student on the cell's evaluation sets (one pass per set)."""
    # samples a dataset-level augmenter added train the student only: metrics on the training
    # split (group shares, train/... groups, DFR) see the split's own samples
    parts.data.train.clear_samples()
    teacher_logits = None
    if parts.teacher_reader is not None:
        tdir = run_dir / "teachers" / cell.teacher.id / "eval"
        reader = parts.teacher_reader
        teacher_logits = ev.TeacherLogits(lambda x: reader.read(x).logits, parts.device, tdir)
    with _eval_mode(parts.student, parts.distiller):
        per_set = ev.evaluate(
            parts.student_logits, parts.sets, parts.device, parts.ctx, teacher=teacher_logits
        )
        metrics = ev.final_metrics(per_set)
        d = parts.data
        hook_view = dict(sets=parts.sets, train=d.train, val=d.val, device=parts.device, ctx=parts.ctx)
        student_view = ev.TrainedModel(
            "student", parts.student, parts.sspec, parts.student_logits, **hook_view
        )
        student_view.options, student_view.seed = cell.eval.model_dump(), cell.seed
        metrics.update(ev.model_hooks(student_view))
    return metrics


def _per_epoch(sets: dict[str, ev.EvalSet]) -> dict[str, ev.EvalSet]:
    return {k: s for k, s in sets.items() if s.per_epoch}


@contextmanager
def _eval_mode(*modules: nn.Module):
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(modules, was, strict=True):
            m.train(w)


def _take(batches: Batches, n: int):
    got = 0
    for x, y, i in batches.iterate(None, drop_singletons=False):
        yield x, y, i
        got += len(x)
        if got >= n:
            return
