"""TensorBoard event files: the default logger (``loggers:`` unset), when ``tensorboard`` is
installed (the ``plot`` extra).

Each epoch row becomes scalars ``<stage>/<key>`` at step ``epoch + 1`` (``train/loss/kd``,
``train/lr``, ``train/test/top1``), in ``<cell dir>/tb/``; ``tensorboard --logdir runs/<grid>``
shows every cell. Keys are those of ``torch.utils.tensorboard.SummaryWriter``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdbench.errors import PluginError
from kdbench.loggers.base import Logger, RunInfo, missing_library


class TensorBoard(Logger):
    """Event files per cell. ``log_dir`` (default: ``tb`` in the cell's directory) given, the
    events go to ``<log_dir>/<grid>/<cell id>``."""

    def __init__(
        self,
        log_dir: str | None = None,
        comment: str = "",
        purge_step: int | None = None,
        max_queue: int = 10,
        flush_secs: int = 30,
        filename_suffix: str = "",
    ):
        self.log_dir = log_dir
        self.options = dict(
            comment=comment,
            purge_step=purge_step,
            max_queue=max_queue,
            flush_secs=flush_secs,
            filename_suffix=filename_suffix,
        )
        self.writer: Any = None

    @staticmethod
    def installed() -> bool:
        return importlib.util.find_spec("tensorboard") is not None

    @staticmethod
    def check_params(params: dict[str, Any]) -> None:
        if not TensorBoard.installed():
            raise PluginError(f"logger 'tensorboard' {missing_library('tensorboard', 'plot')}")

    def start(self, run: RunInfo) -> None:
        # the writer opens with the first row: a cell failing before its first epoch leaves no events
        self.where = run.dir / "tb" if self.log_dir is None else Path(self.log_dir) / run.group / run.id

    def log_metrics(self, metrics: Mapping[str, float], step: int, stage: str) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.where), **self.options)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, status: str, metrics: Mapping[str, float]) -> None:
        if self.writer is not None:
            self.writer.close()
