"""The contract every dataset (``kdbench.datasets`` plugin) implements.

A dataset plugin is a class; the grid builds it as ``cls(root=..., **params)``. Its
``split(name)`` returns a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs where
``image`` is a normalised float tensor ``[C, H, W]`` and ``label`` an int. Augmentation is
not the dataset's job (augmenters work on batches). Small datasets should return a
``TensorDataset`` (the engine then batches by indexing, with no worker processes).

Optional, all with safe defaults:

* ``meta(split)``: per-sample metadata of a split, ``{key: Tensor[N]}`` aligned with the
  split's order, e.g. ``"group"`` (long, ``g = y * n_attr + a`` as group_DRO / WILDS'
  CombinatorialGrouper define it) and ``"attr"``. Batches carry it to methods
  (``Batch.meta``) and evaluation sets to metric families.
* ``group_info()``: a :class:`GroupInfo` when the data has groups.
* ``eval_splits()``: extra named test sets (e.g. ``"test_reversed"``), evaluated like
  ``test``; their metadata via ``meta(name)``. A set whose metadata has ``"spurious_only"``
  holds images that show only a class's spurious feature (labelled with that class): it gets
  the spurious mAUC against ``test`` instead of accuracy (``robustness/spurious_auc.py``).
* a ``"val"`` entry in ``splits``: a validation split of the dataset's own, used instead of
  a held-out part of ``train`` when the grid asks for validation (``eval.val_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import Dataset

from kdbench.errors import DataError


@dataclass(frozen=True)
class GroupInfo:
    """How a dataset's samples fall into groups: ``group = y * n_attr + attr``."""

    n_groups: int
    names: list[str] = field(default_factory=list)
    attr_names: list[str] = field(default_factory=list)
    n_attr: int = 1


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

    def meta(self, split: str) -> dict[str, torch.Tensor]:
        """Per-sample metadata of ``split`` (a split name or an ``eval_splits`` name); {} if none."""
        return {}

    def group_info(self) -> GroupInfo | None:
        """The group definition when samples carry a ``"group"`` in :meth:`meta`; else None."""
        return None

    def eval_splits(self) -> dict[str, Dataset]:
        """Extra named evaluation sets besides ``test`` (e.g. a reversed-correlation test)."""
        return {}

    def groups(self, split: str) -> torch.Tensor | None:
        """Group id per sample, or None (shorthand for ``meta(split).get("group")``)."""
        return self.meta(split).get("group")

    def fingerprint(self) -> dict:
        """What identifies this data for cell hashing (name, root, sizes...)."""
        return {"class": type(self).__name__, "root": str(self.root) if self.root else None}
