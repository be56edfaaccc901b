"""Built-in datasets, read from tiny files written in the real formats (no loader mocking)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from kdbench.datasets.mnist import MNIST, Digits, FashionMNIST, MNIST5k, read_idx
from kdbench.errors import DataError

# --- mnist5k / digits (data shipped inside installed packages) -----------------------------


@pytest.fixture(scope="module")
def mnist5k() -> MNIST5k:
    return MNIST5k()


def test_mnist5k_splits_are_stratified_normalised_tensor_datasets(mnist5k: MNIST5k) -> None:
    train, test = mnist5k.split("train"), mnist5k.split("test")
    assert isinstance(train, TensorDataset)
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) < 10
    xs = train.tensors[0]
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-3
    xb, yb = train[torch.arange(32)]
    assert xb.shape == (32, 1, 28, 28) and yb.shape == (32,)
    assert torch.equal(xb, xs[:32])
    assert (mnist5k.num_classes, mnist5k.in_channels, mnist5k.image_size) == (10, 1, 28)


def test_mnist5k_split_is_fixed_and_limit_keeps_classes_mixed(mnist5k: MNIST5k) -> None:
    again = MNIST5k(limit=50)
    small = again.split("train")
    assert len(small) == 50 and len(torch.unique(small.labels)) >= 5
    assert torch.equal(small.images, mnist5k.split("train").images[:50])
    assert torch.equal(again.split("test").images, mnist5k.split("test").images)


def test_mnist5k_fingerprint_follows_params(mnist5k: MNIST5k) -> None:
    fp = mnist5k.fingerprint()
    assert fp["sizes"] == {"train": 4000, "test": 1000}
    other = MNIST5k(test_fraction=0.1).fingerprint()
    assert other["sizes"] == {"train": 4500, "test": 500} and other != fp
    assert MNIST5k().fingerprint() == fp


def test_digits_is_tiny_and_native_8x8() -> None:
    d = Digits(limit=100)
    train, test = d.split("train"), d.split("test")
    assert len(train) == 100 and len(test) == 359
    assert train[0][0].shape == (1, 8, 8) and d.image_size == 8


def test_unknown_split_and_bad_params_are_data_errors(mnist5k: MNIST5k) -> None:
    with pytest.raises(DataError, match="no split 'val'"):
        mnist5k.split("val")
    with pytest.raises(DataError, match="test_fraction"):
        MNIST5k(test_fraction=1.5)
    with pytest.raises(DataError, match="limit"):
        Digits(limit=0)


# --- IDX files (MNIST / Fashion-MNIST) -----------------------------------------------------

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0x0000, type 0x08, ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[split] = (images, labels)
        for name, array in zip(IDX_NAMES[split], (images, labels), strict=True):
            data = idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_dataset(tmp_path, gz=gz)
    ds = FashionMNIST(root=str(tmp_path))
    train, test = ds.split("train"), ds.split("test")
    assert (len(train), len(test)) == (30, 10)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert train.labels.tolist() == arrays["train"][1].tolist()
    x, y = test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == 3
    assert abs(float(train.tensors[0].mean())) < 1e-4
    assert len(FashionMNIST(root=str(tmp_path), limit=7).split("train")) == 7
    fp = ds.fingerprint()
    assert fp["sizes"] == {"train": 30, "test": 10} and fp["root"] == str(tmp_path)


def test_mnist_finds_torchvision_layout_and_fingerprint_tracks_content(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "MNIST" / "raw", gz=False)
    ds = MNIST(root=str(tmp_path))
    assert len(ds.split("train")) == 30
    before = ds.fingerprint()
    write_idx_dataset(tmp_path / "MNIST" / "raw", n_train=40, gz=False)
    after = MNIST(root=str(tmp_path)).fingerprint()
    assert after != before and after["sizes"]["train"] == 40


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(data[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: truncated"):
        FashionMNIST(root=str(tmp_path)).split("train")
    images.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not an IDX file"):
        FashionMNIST(root=str(tmp_path)).split("train")
    labels = tmp_path / "train-labels-idx1-ubyte"
    with pytest.raises(DataError, match="expected an IDX file with 3 dimensions"):
        read_idx(labels, 3)
    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))[:-30])
    with pytest.raises(DataError, match="t.gz: cannot read"):
        read_idx(gz, 3)


def test_idx_missing_root_or_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        FashionMNIST(root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="needs `root:`"):
        MNIST()
    write_idx_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\) not found"):
        FashionMNIST(root=str(tmp_path)).split("test")


def test_fashion_mnist_default_root_hint() -> None:
    if Path(FashionMNIST.default_root).exists():
        ds = FashionMNIST(limit=10)
        assert ds.fingerprint()["sizes"] == {"train": 60000, "test": 10000}
    else:
        with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
            FashionMNIST()
