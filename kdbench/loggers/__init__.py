"""Loggers: where a cell's training is reported besides its own files (``kdbench.loggers``
plugins: TensorBoard, Weights & Biases, MLflow). The contract is in :mod:`.base`."""

from kdbench.loggers.base import (
    ARTIFACTS,
    DEFAULT,
    CellLoggers,
    Logger,
    RunInfo,
    cell_loggers,
    start_loggers,
)

__all__ = ["ARTIFACTS", "DEFAULT", "CellLoggers", "Logger", "RunInfo", "cell_loggers", "start_loggers"]
