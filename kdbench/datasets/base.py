"""The contract every dataset (``kdbench.datasets`` plugin) implements.

A dataset plugin is a class; the grid builds it as ``cls(root=..., **params)``. Its
``split(name)`` returns a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs where
``image`` is a normalised float tensor ``[C, H, W]`` and ``label`` an int. Augmentation is
not the dataset's job (augmenters work on batches). Small datasets should return a
``TensorDataset`` (the engine then batches by indexing, with no worker processes).

Optional: ``groups(split)`` for group-robustness datasets (one int group id per sample,
with ``group_names``), used by the robustness reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import Dataset

from kdbench.errors import DataError


class KDDataset:
    """Base class of dataset plugins."""

    num_classes: ClassVar[int]
    in_channels: ClassVar[int]
    image_size: ClassVar[int]
    #: True when the data needs a user-supplied ``root`` (CIFAR, ImageNet folders)
    needs_root: ClassVar[bool] = False
    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    def __init__(self, root: str | None = None):
        self.root = Path(root).expanduser() if root else None
        if self.needs_root:
            if self.root is None:
                raise DataError(f"dataset {type(self).__name__} needs `root:` (a local directory)")
            if not self.root.exists():
                raise DataError(f"dataset root {str(self.root)!r} does not exist")

    def split(self, name: str) -> Dataset:
        raise NotImplementedError

    def groups(self, split: str) -> torch.Tensor | None:
        """Group id per sample (group-robustness datasets); None when there are no groups."""
        return None

    def fingerprint(self) -> dict:
        """What identifies this data for cell hashing (name, root, sizes...)."""
        return {"class": type(self).__name__, "root": str(self.root) if self.root else None}
