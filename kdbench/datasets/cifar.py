"""CIFAR-10 and CIFAR-100 from a local copy of the standard "python version" archives.

Layout (as extracted from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``)::

    cifar-10-batches-py/ data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/    train, test, meta

``root`` may be that directory or its parent. The files are read directly rather than
through ``torchvision.datasets.CIFAR10``: torchvision verifies md5 sums of the whole
archive files (so a re-packed or test copy fails) and yields PIL images one at a time,
where we want one uint8 tensor. Images stay uint8 in memory (150 MB for CIFAR-10 train
instead of 600 MB as float32) and are normalised per batch when indexed.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kdbench.datasets._util import InMemoryDataset, file_digest
from kdbench.datasets.base import KDDataset
from kdbench.errors import DataError


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dicts, lists and scalars only: a CIFAR file cannot run code."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        # the original files (Python 2, numpy 1) name numpy.core, numpy 2 calls it numpy._core
        canonical = "numpy._core" + module[len("numpy.core") :] if module.startswith("numpy.core") else module
        if (canonical, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if canonical != module and not hasattr(np, "_core"):  # numpy 1
            canonical = module
        return super().find_class(canonical, name)


def load_pickle(path: Path) -> dict:
    """One CIFAR pickle (written by Python 2 or 3) as a dict with bytes keys."""
    try:
        with path.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a readable CIFAR pickle ({e}); extract the archive again") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Python 3 writers may have used str keys; the original files use bytes
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


class _CIFAR(InMemoryDataset):
    """Shared reader of the CIFAR python pickles."""

    in_channels: ClassVar[int] = 3
    image_size: ClassVar[int] = 32
    needs_root: ClassVar[bool] = True
    #: name of the extracted directory
    dirname: ClassVar[str]
    #: split -> pickle files
    files: ClassVar[dict[str, tuple[str, ...]]]
    meta_file: ClassVar[str]
    label_key: ClassVar[bytes]
    names_key: ClassVar[bytes]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(self, root: str | None = None, limit: int | None = None):
        super().__init__(root, limit)
        self.dir = self._resolve_dir()
        self._class_names: list[str] | None = None

    def _all_files(self) -> list[str]:
        return [self.meta_file, *(n for names in self.files.values() for n in names)]

    def _resolve_dir(self) -> Path:
        assert self.root is not None
        for d in (self.root, self.root / self.dirname):
            if (d / self.meta_file).is_file():
                missing = [n for n in self._all_files() if not (d / n).is_file()]
                if missing:
                    raise DataError(
                        f"dataset {type(self).__name__}: {d} lacks {', '.join(missing)} "
                        f"(expected {', '.join(self._all_files())}); extract the archive again"
                    )
                return d
        raise DataError(
            f"dataset {type(self).__name__}: no {self.meta_file} in {self.root} or "
            f"{self.root / self.dirname}; `root:` must be the extracted {self.dirname}/ "
            f"directory (with {', '.join(self._all_files())}) or its parent"
        )

    @property
    def class_names(self) -> list[str]:
        """Class names from the meta file, in label order."""
        if self._class_names is None:
            path = self.dir / self.meta_file
            meta = load_pickle(path)
            if self.names_key not in meta:
                raise DataError(f"{path}: no {self.names_key!r} key")
            self._class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[self.names_key]]
        return self._class_names

    def _read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.dir / name
        batch = load_pickle(path)
        for key in (b"data", self.label_key):
            if key not in batch:
                raise DataError(f"{path}: no {key!r} key (keys: {sorted(batch)}); is this {self.dirname}?")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[self.label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: expected uint8 data of shape [N, 3072], got {data.dtype} {data.shape}")
        if len(labels) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
        if len(labels) and not 0 <= labels.min() <= labels.max() < self.num_classes:
            raise DataError(f"{path}: labels outside 0..{self.num_classes - 1}")
        return data, labels

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for split, names in self.files.items():
            parts = [self._read(n) for n in names]
            data = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            # rows are 1024 red, 1024 green, 1024 blue values: already channel-first
            out[split] = (torch.from_numpy(data).view(-1, 3, 32, 32), torch.from_numpy(labels))
        return out

    def _stats(self, train_images: torch.Tensor) -> tuple[list[float], list[float]]:
        # the customary constants, so results compare with published numbers
        return list(self.mean), list(self.std)

    def fingerprint(self) -> dict:
        return {
            **KDDataset.fingerprint(self),
            "dir": str(self.dir),
            "params": self._params(),
            "files": {n: file_digest(self.dir / n) for n in self._all_files()},
        }


class CIFAR10(_CIFAR):
    """CIFAR-10: 50 000 / 10 000 colour 32x32 images, 10 classes."""

    num_classes: ClassVar[int] = 10
    dirname: ClassVar[str] = "cifar-10-batches-py"
    files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }
    meta_file: ClassVar[str] = "batches.meta"
    label_key: ClassVar[bytes] = b"labels"
    names_key: ClassVar[bytes] = b"label_names"
    mean: ClassVar[tuple[float, float, float]] = (0.4914, 0.4822, 0.4465)
    std: ClassVar[tuple[float, float, float]] = (0.2470, 0.2435, 0.2616)


class CIFAR100(_CIFAR):
    """CIFAR-100: 50 000 / 10 000 colour 32x32 images, 100 fine classes."""

    num_classes: ClassVar[int] = 100
    dirname: ClassVar[str] = "cifar-100-python"
    files: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train",), "test": ("test",)}
    meta_file: ClassVar[str] = "meta"
    label_key: ClassVar[bytes] = b"fine_labels"
    names_key: ClassVar[bytes] = b"fine_label_names"
    mean: ClassVar[tuple[float, float, float]] = (0.5071, 0.4865, 0.4409)
    std: ClassVar[tuple[float, float, float]] = (0.2673, 0.2564, 0.2762)
