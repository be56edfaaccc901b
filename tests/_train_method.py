"""Train a method for a few epochs on tiny tensors (the new baselines' end-to-end checks)."""

from __future__ import annotations

import numpy as np
import torch

from kdbench.cells import TrainRecipe
from kdbench.engine.data import Batches
from kdbench.engine.train import TrainSetup, train
from kdbench.features import FeatureReader


def train_method(
    method: torch.nn.Module,
    params: dict,
    student: torch.nn.Module,
    student_reader: FeatureReader,
    teacher_reader: FeatureReader,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
) -> dict:
    """``epochs`` of SGD (lr 0.05, cosine, batch 16, no weight decay, no augmentation) with the
    method's default loss weights; the epoch row, its numbers checked finite."""
    recipe = TrainRecipe(
        epochs=epochs, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
        schedule="cosine",
    )  # fmt: skip
    row = train(
        TrainSetup(
            student=student,
            student_reader=student_reader,
            recipe=recipe,
            train_data=Batches(torch.utils.data.TensorDataset(x, y), 16),
            device=torch.device("cpu"),
            seed=0,
            augment=lambda x, g: x,
            distiller=method,
            teacher_reader=teacher_reader,
            weights={"ce": 1.0, **type(method).weights_for(**params)},
            workdir=None,
        )
    )
    assert all(np.isfinite(v) for v in row.values() if isinstance(v, float)), row
    return row
