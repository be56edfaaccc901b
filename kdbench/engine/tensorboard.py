"""TensorBoard event files for every cell (when the ``plot`` extra installs ``tensorboard``).

The engine calls :func:`log_row` with each row it appends to ``metrics.jsonl`` (loss terms,
learning rate, per-epoch evaluation); the events go to ``<cell dir>/tb/``. Without the
package this is a no-op, so the core install needs nothing more.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

_writers: dict[str, Any] = {}


def _writer(workdir: Path):
    key = str(workdir)
    if key not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: nothing to write
            _writers[key] = None
        else:
            _writers[key] = SummaryWriter(log_dir=str(Path(workdir) / "tb"), flush_secs=30)
    return _writers[key]


def log_row(workdir: Path | None, row: dict[str, Any]) -> None:
    """Write a metrics row's numbers as scalars ``<stage>/<key>`` at step ``epoch + 1``."""
    if workdir is None:
        return
    w = _writer(Path(workdir))
    if w is None:
        return
    stage = row.get("stage", "train")
    step = int(row.get("epoch", 0)) + 1
    for k, v in row.items():
        if k in ("stage", "epoch") or isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        tag = k.replace("loss_", "loss/") if k.startswith("loss_") else k
        w.add_scalar(f"{stage}/{tag}", float(v), step)
    w.flush()


def close_all() -> None:
    """Close every open writer (a cell's end: no descriptor outlives its cell)."""
    for key in list(_writers):
        w = _writers.pop(key)
        if w is not None:
            w.close()


def close(workdir: Path | None) -> None:
    """Close a cell's writer (the engine calls it when the cell ends)."""
    if workdir is None:
        return
    w = _writers.pop(str(workdir), None)
    if w is not None:
        w.close()
