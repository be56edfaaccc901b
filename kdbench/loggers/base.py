"""The logger contract: where a cell's training is reported besides its own files.

A logger is a ``kdbench.loggers`` plugin: a class built with the grid's keys for it (the
parameters of its library's own init call), then told about one cell at a time::

    logger = Plugin(**params)             # loggers: [{wandb: {project: p, mode: offline}}]
    logger.start(run)                     # a RunInfo: id, name, grid, tags, config, directories
    logger.log_metrics(metrics, step, stage)   # one epoch of a stage: {"train/loss/kd": 0.4, ...}
    logger.log_artifact(path)             # config.json, metrics.jsonl, result.json, student.pt, log.txt
    logger.finish(status, metrics)        # "done" | "failed" | "stopped", the cell's final numbers

:class:`CellLoggers` drives the loggers of one cell and keeps them from hurting it: a logger
that fails to load, to start or later is dropped for that cell with a message in the cell's
``log.txt`` and in its result (``env["logger_problems"]``, which ``kdbench run`` prints once per
distinct problem), and the cell trains on.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

    from kdbench.cells import Cell, PluginKey

#: the cell files a logger receives as artefacts when the cell ends (those that exist)
ARTIFACTS = ("config.json", "metrics.jsonl", "result.json", "student.pt", "log.txt")


@dataclass(frozen=True)
class RunInfo:
    """What a logger is told about the run it logs (a cell, or a teacher trained by recipe)."""

    #: the cell id (a content hash; the same cell in two grids has the same id)
    id: str
    #: one line naming the run: "kd resnet32x4→resnet8x4 cifar100 seed 0"
    name: str
    #: the grid's name (W&B group and default project, MLflow experiment)
    group: str
    #: the cell's directory (``runs/<grid>/cells/<id>``) and the run directory (``runs/<grid>``)
    dir: Path
    run_dir: Path
    #: what the run is, for filtering: method, pair, dataset, seed, cell
    tags: dict[str, str] = field(default_factory=dict)
    #: the cell's full config (``config.json``)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_cell(cls, cell: Cell, cell_dir: Path) -> RunInfo:
        cell_dir = Path(cell_dir)
        return cls(
            id=cell.id,
            name=cell.describe,
            group=cell.grid,
            dir=cell_dir,
            run_dir=cell_dir.parent.parent,
            tags={
                "method": cell.method.label,
                "pair": f"{cell.teacher.label}→{cell.student.label}",
                "dataset": cell.dataset.name,
                "seed": str(cell.seed),
                "cell": cell.id,
            },
            config=cell.to_dict(),
        )


class Logger:
    """Base of a ``kdbench.loggers`` plugin; override what the library supports.

    ``__init__`` takes the grid's keys for the logger (checked against its signature, or by a
    ``check_params(params)`` static method for one taking ``**kwargs``); nothing heavy happens
    there: the library is imported and the run opened in :meth:`start`. One instance logs one
    cell. Every method may raise: the cell's :class:`CellLoggers` reports it and drops the logger.
    """

    def start(self, run: RunInfo) -> None:
        """Open the run of one cell."""

    def log_metrics(self, metrics: Mapping[str, float], step: int, stage: str) -> None:
        """Scalars of one epoch of a stage (``step`` counts that stage's epochs from 1), named
        ``<stage>/<name>`` (``train/loss/kd``, ``train/lr``, ``train/test/top1``)."""

    def log_artifact(self, path: Path) -> None:
        """A file of the cell (called when the cell ends, for each of :data:`ARTIFACTS`)."""

    def finish(self, status: str, metrics: Mapping[str, float]) -> None:
        """Close the run: ``status`` is "done", "failed" or "stopped" (to be resumed);
        ``metrics`` the cell's final numbers, flat (empty unless done)."""


# ------------------------------------------------------------------------------ rows, configs


def row_scalars(row: Mapping[str, Any]) -> tuple[str, int, dict[str, float]]:
    """An engine ``metrics.jsonl`` row as (stage, step, scalars): numbers only, named
    ``<stage>/<key>`` with ``loss_x`` as ``loss/x``, at step ``epoch + 1``."""
    stage = str(row.get("stage", "train"))
    step = int(row.get("epoch", 0)) + 1
    out = {}
    for k, v in row.items():
        if k in ("stage", "epoch") or isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        tag = k.replace("loss_", "loss/", 1) if k.startswith("loss_") else k
        out[f"{stage}/{tag}"] = float(v)
    return stage, step, out


def flat_numbers(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, keys joined with ``/``."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_numbers(v, key + "/"))
        elif isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``train.lr``, ``method.params.T``); lists kept whole."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flat_config(v, key + "."))
        elif not isinstance(v, Mapping):
            out[key] = v
    return out


def missing_library(package: str, extra: str) -> str:
    """The message for a logger whose library is not installed."""
    return f"needs the {package} package, which is not installed: pip install 'kdbench[{extra}]'"


# ------------------------------------------------------------------------------ one cell's loggers


class CellLoggers:
    """The started loggers of one cell; a logger that raises is dropped with a clear message,
    kept in :attr:`problems` (the same text for every cell it happens to)."""

    def __init__(self, run: RunInfo | None, log: logging.Logger | None = None):
        self.run, self.log = run, log
        self.active: list[tuple[str, Logger]] = []
        self.problems: list[str] = []
        self.finished = False

    def start(self, name: str, logger: Logger) -> None:
        if self.run is not None and self._call(name, "start", logger.start, self.run):
            self.active.append((name, logger))

    def log_row(self, row: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` row (see :func:`row_scalars`) to every logger."""
        if not self.active:
            return
        stage, step, scalars = row_scalars(row)
        for name, logger in list(self.active):
            self._guarded(name, "log metrics", logger.log_metrics, scalars, step, stage)

    def log_artifact(self, path: Path) -> None:
        for name, logger in list(self.active):
            self._guarded(name, f"log {Path(path).name}", logger.log_artifact, Path(path))

    def finish(self, status: str, metrics: Mapping[str, Any] | None = None, artifacts: Sequence[Path] = ()):
        """Hand over the cell's files that exist, then close every run (once; later calls do nothing)."""
        if self.finished:
            return
        self.finished = True
        for path in artifacts:
            if Path(path).is_file():
                self.log_artifact(Path(path))
        numbers_ = flat_numbers(metrics or {})
        for name, logger in list(self.active):
            self._guarded(name, "finish", logger.finish, status, numbers_)
        self.active.clear()

    def failed(self, name: str, what: str, e: BaseException | str) -> None:
        """Record a logger's failure, in the cell's log and in :attr:`problems`."""
        why = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        why = " ".join(why.split())[:300]  # one line (a validation error spans several)
        msg = f"logger {name!r} failed to {what}: {why}; the cell runs on without it"
        if self.log is not None:
            self.log.warning("%s", msg)
        self.problems.append(msg)

    def _guarded(self, name: str, what: str, fn: Any, *args: Any) -> None:
        if not self._call(name, what, fn, *args):
            self.active = [(n, lg) for n, lg in self.active if n != name]

    def _call(self, name: str, what: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
        except Exception as e:  # a logger never fails its cell
            self.failed(name, what, e)
            return False
        return True


#: the loggers of a grid that does not name any: TensorBoard event files, when installed
DEFAULT = ("tensorboard",)


def start_loggers(
    keys: Sequence[PluginKey] | None, run: RunInfo | None, log: logging.Logger | None = None
) -> CellLoggers:
    """Build and start ``keys``' loggers for ``run`` (None: :data:`DEFAULT`, each skipped
    quietly when its library is not installed; ``run`` None: no loggers, e.g. a DDP rank > 0)."""
    from kdbench import registry

    out = CellLoggers(run, log)
    if run is None:
        return out
    entries = [(k.name, dict(k.params)) for k in keys] if keys is not None else [(n, {}) for n in DEFAULT]
    for name, params in entries:
        try:
            cls = registry.load("loggers", name)
            logger = cls(**params)
        except Exception as e:
            out.failed(name, "load", e)
            continue
        if keys is None and not _installed(cls):
            continue
        out.start(name, logger)
    return out


def _installed(cls: type) -> bool:
    check = getattr(cls, "installed", None)
    return bool(check()) if callable(check) else True


@contextmanager
def cell_loggers(
    keys: Sequence[PluginKey] | None, run: RunInfo | None, log: logging.Logger | None = None
) -> Iterator[CellLoggers]:
    """:func:`start_loggers` for the span of a cell: runs still open when it ends (an exception,
    a stop request, a lockstep group closing the cell) are finished as "stopped"."""
    loggers = start_loggers(keys, run, log)
    try:
        yield loggers
    finally:
        loggers.finish("stopped")


def safe_key(key: str, allowed: str = r"[^A-Za-z0-9_\-. /:]") -> str:
    """``key`` with the characters a tracker refuses replaced by ``_``."""
    return re.sub(allowed, "_", key)
