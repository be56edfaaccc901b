"""Built-in datasets, read from tiny files written in the real formats (no loader mocking)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from kdbench.datasets.cifar import CIFAR10, CIFAR100
from kdbench.datasets.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
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


def test_packaged_arrays_are_decoded_once_and_a_bad_cache_is_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path))
    parsed = []
    raw = MNIST5k._raw
    monkeypatch.setattr(MNIST5k, "_raw", lambda self: parsed.append(1) or raw(self))
    first = MNIST5k()._decoded()
    (entry,) = (tmp_path / "arrays").glob("mnist5k-*.npz")
    again = MNIST5k()._decoded()
    assert len(parsed) == 1  # the second process-like load read the cached arrays
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert first[0].dtype == torch.uint8 and first[1].dtype == torch.int64
    entry.write_bytes(b"not an npz")  # a cut-short or foreign file: parsed again, replaced
    rebuilt = MNIST5k()._decoded()
    assert len(parsed) == 2 and all(torch.equal(a, b) for a, b in zip(first, rebuilt, strict=True))
    cached = MNIST5k()._decoded()
    assert all(torch.equal(a, b) for a, b in zip(first, cached, strict=True)) and len(parsed) == 2


def test_mnist5k_split_is_fixed_and_limit_keeps_classes_mixed(mnist5k: MNIST5k) -> None:
    again = MNIST5k(limit=50)
    small = again.split("train")
    assert len(small) == 50 and len(torch.unique(small.labels)) >= 5
    assert torch.equal(small.images, mnist5k.split("train").images[:50])
    assert torch.equal(again.split("test").images, mnist5k.split("test").images)


def test_mnist5k_fingerprint_follows_params(mnist5k: MNIST5k) -> None:
    fp = mnist5k.fingerprint()
    assert fp["params"] == {"test_fraction": 0.2, "limit": None}
    assert list(fp["files"]) == ["mnist_5k.csv.gz"]  # the file's bytes, not its parsed arrays
    other = MNIST5k(test_fraction=0.1).fingerprint()
    assert other != fp and other["files"] == fp["files"]
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


# --- CIFAR python pickles ------------------------------------------------------------------


def write_pickle(path: Path, obj: dict, py2_names: bool = False) -> None:
    data = pickle.dumps(obj, protocol=2)
    if py2_names:  # the original archives were pickled by Python 2 with numpy 1
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


def write_cifar10(root: Path, per_batch: int = 4, py2_names: bool = True) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        write_pickle(
            d / name,
            {
                b"batch_label": f"batch {i}".encode(),
                b"labels": [(i + j) % 10 for j in range(per_batch)],
                b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
            py2_names,
        )
    labels = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    write_pickle(
        d / "batches.meta",
        {b"label_names": labels, b"num_cases_per_batch": per_batch, b"num_vis": 3072},
        py2_names,
    )
    return d


def write_cifar100(root: Path, n: int = 6) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in ("train", "test"):
        write_pickle(
            d / name,
            {
                b"filenames": [f"{name}_{j}.png".encode() for j in range(n)],
                b"batch_label": name.encode(),
                b"fine_labels": [(17 * j) % 100 for j in range(n)],
                b"coarse_labels": [j % 20 for j in range(n)],
                b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            },
        )
    write_pickle(
        d / "meta",
        {
            b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
        },
    )
    return d


@pytest.mark.parametrize("point_at", ["parent", "dir"])
def test_cifar10_reads_python_pickles(tmp_path: Path, point_at: str) -> None:
    d = write_cifar10(tmp_path)
    ds = CIFAR10(root=str(tmp_path if point_at == "parent" else d))
    train, test = ds.split("train"), ds.split("test")
    assert isinstance(train, TensorDataset) and (len(train), len(test)) == (20, 4)
    raw = pickle.loads((d / "data_batch_2").read_bytes(), encoding="bytes")
    # rows are channel-first: 1024 R, 1024 G, 1024 B
    assert torch.equal(train.images[4], torch.from_numpy(raw[b"data"][0]).view(3, 32, 32))
    assert train.labels[4:8].tolist() == raw[b"labels"]
    x, y = train[4]
    mean, std = torch.tensor(CIFAR10.mean).view(3, 1, 1), torch.tensor(CIFAR10.std).view(3, 1, 1)
    assert torch.allclose(x, (train.images[4].float() / 255 - mean) / std, atol=1e-5)
    xb, yb = train[torch.tensor([0, 5, 19])]
    assert xb.shape == (3, 3, 32, 32) and xb.dtype == torch.float32
    assert yb.tolist() == train.labels[[0, 5, 19]].tolist()
    assert ds.class_names[:2] == ["airplane", "automobile"]
    assert len(CIFAR10(root=str(tmp_path), limit=3).split("train")) == 3
    fp = ds.fingerprint()
    assert set(fp["files"]) >= {"data_batch_1", "test_batch"}


def test_cifar100_uses_fine_labels_and_fingerprint_tracks_content(tmp_path: Path) -> None:
    d = write_cifar100(tmp_path)
    ds = CIFAR100(root=str(tmp_path))
    assert ds.num_classes == 100 and ds.class_names[17] == "c17"
    assert ds.split("test").labels.tolist() == [(17 * j) % 100 for j in range(6)]
    before = ds.fingerprint()
    write_pickle(d / "train", {b"fine_labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8)})
    after = CIFAR100(root=str(tmp_path)).fingerprint()
    assert after["files"]["train"] != before["files"]["train"]


def test_cifar_errors_say_what_is_expected_where(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        CIFAR10(root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="needs `root:`"):
        CIFAR100()
    with pytest.raises(DataError, match=r"no batches.meta in .*cifar-10-batches-py"):
        CIFAR10(root=str(tmp_path))
    d = write_cifar10(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3"):
        CIFAR10(root=str(tmp_path))
    write_pickle(d / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match=r"data_batch_3: no b'labels' key"):
        CIFAR10(root=str(tmp_path)).split("train")
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:40])
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR pickle"):
        CIFAR10(root=str(tmp_path)).split("train")


def test_cifar_pickles_cannot_run_code(tmp_path: Path) -> None:
    d = write_cifar10(tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load pathlib"):
        CIFAR10(root=str(tmp_path)).split("test")


# --- ImageNet-style folders ----------------------------------------------------------------


def write_folder(root: Path, splits: dict[str, dict[str, int]], size: tuple[int, int] = (40, 30)) -> None:
    rng = np.random.default_rng(3)
    for split, classes in splits.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_loads_lazily_resized_and_normalised(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": {"cat": 2, "dog": 3, "eel": 1}, "val": {"dog": 2, "eel": 1}})
    Image.fromarray(np.zeros((30, 40), np.uint8), mode="L").save(tmp_path / "train" / "cat" / "grey.png")
    ds = ImageFolderDataset(root=str(tmp_path), image_size=16)
    assert ds.num_classes == 3 and ds.classes == ["cat", "dog", "eel"] and ds.resize == 18
    train = ds.split("train")
    assert not isinstance(train, TensorDataset) and len(train) == 7
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    grey_index = [Path(p).name for p, _ in train.samples].index("grey.png")
    grey, _ = train[grey_index]  # converted to RGB; black maps to -mean/std
    assert torch.allclose(grey[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))
    # val lacks "cat": labels still follow train's class list; "test" falls back to val/
    test = ds.split("test")
    assert [label for _, label in test.samples] == [1, 1, 2]
    fp = ds.fingerprint()
    assert fp["sizes"] == {"train": 7, "test": 3} and fp["params"] == {"image_size": 16, "resize": 18}
    write_folder(tmp_path, {"val": {"eel": 2}})
    assert ImageFolderDataset(root=str(tmp_path), image_size=16).fingerprint()["files"] != fp["files"]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split 'train' needs .*train/"):
        ImageFolderDataset(root=str(tmp_path))
    write_folder(tmp_path, {"train": {"a": 1}, "val": {"a": 1, "zebra": 1}})
    ds = ImageFolderDataset(root=str(tmp_path), image_size=8)
    with pytest.raises(DataError, match="class directories that train/ lacks: zebra"):
        ds.split("val")
    with pytest.raises(DataError, match="no split 'holdout'"):
        ds.split("holdout")
