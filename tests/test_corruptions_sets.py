"""Corrupted test sets: generation + cache, real CIFAR-10-C folders, selection, aggregates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.datasets import cifar_c
from kdbench.datasets._util import NormalizedImages
from kdbench.errors import ConfigError, DataError
from kdbench.robustness.corruptions import ALL, CORRUPTIONS, EXTRA, corrupt


class _Cell(dict):
    """A cell entry readable both as a mapping and by attribute (``cell.eval``)."""

    __getattr__ = dict.__getitem__


def _split(n=12, c=1, size=28, seed=0) -> NormalizedImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return NormalizedImages(images, labels, [0.3] * c, [0.2] * c)


def test_selection():
    assert cifar_c.selected({}) == ([], [])
    assert cifar_c.selected({"corruptions": None}) == ([], [])
    names, sev = cifar_c.selected({"corruptions": "all"})
    assert names == list(CORRUPTIONS) and sev == [1, 2, 3, 4, 5]
    assert cifar_c.selected({"corruptions": ["fog", "snow"], "severities": [5, 1]}) == (
        ["fog", "snow"],
        [1, 5],
    )
    assert cifar_c.selected({"corruptions_root": "/x"})[0] == list(CORRUPTIONS)
    with pytest.raises(ConfigError, match="unknown 'fgo'"):
        cifar_c.selected({"corruptions": ["fgo"]})
    with pytest.raises(ConfigError, match="1..5"):
        cifar_c.selected({"corruptions": "all", "severities": [0, 6]})


def test_generated_sets_are_cached_and_deterministic(tmp_path, monkeypatch):
    test = _split()
    cfg = {"corruptions": ["fog", "contrast"], "severities": [2, 5], "corruption_seed": 4}
    sets = cifar_c.corruption_sets({"digest": "abc"}, test, cfg, tmp_path)
    assert list(sets) == ["c/fog/2", "c/fog/5", "c/contrast/2", "c/contrast/5"] and len(sets) == 4
    fog = sets["c/fog/2"]
    assert isinstance(fog, NormalizedImages) and fog.mean == test.mean and fog.std == test.std
    # the images are exactly corrupt() of the clean uint8 images, with the configured seed
    want = corrupt(test.images.permute(0, 2, 3, 1).numpy(), "fog", 2, seed=4)
    np.testing.assert_array_equal(fog.images.permute(0, 2, 3, 1).numpy(), want)
    assert torch.equal(fog.labels, test.labels)
    cached = sorted(p.name for p in (tmp_path / "corruptions").glob("*.pt"))
    assert len(cached) == 1 and cached[0].startswith("fog-2-")

    # a second provider (another cell) reads the cache instead of generating
    def boom(*a, **k):
        raise AssertionError("regenerated a cached set")

    monkeypatch.setattr(cifar_c.C, "corrupt", boom)
    again = cifar_c.corruption_sets({"digest": "abc"}, test, cfg, tmp_path)["c/fog/2"]
    assert torch.equal(again.images, fog.images)
    # another dataset fingerprint or seed is another set
    with pytest.raises(AssertionError, match="regenerated"):
        cifar_c.corruption_sets({"digest": "other"}, test, cfg, tmp_path)["c/fog/2"]
    with pytest.raises(AssertionError, match="regenerated"):
        cifar_c.corruption_sets({"digest": "abc"}, test, {**cfg, "corruption_seed": 5}, tmp_path)["c/fog/2"]


def test_damaged_cache_is_rebuilt(tmp_path):
    test = _split()
    cfg = {"corruptions": ["gaussian_noise"], "severities": [3]}
    first = cifar_c.corruption_sets({"d": 1}, test, cfg, tmp_path)["c/gaussian_noise/3"].images.clone()
    (path,) = (tmp_path / "corruptions").glob("*.pt")
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    again = cifar_c.corruption_sets({"d": 1}, test, cfg, tmp_path)["c/gaussian_noise/3"].images
    assert torch.equal(first, again)


def _write_root(root, names, m=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir()
    for n in names:
        np.save(root / f"{n}.npy", rng.integers(0, 256, (5 * m, size, size, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(np.arange(m) % 10, 5).astype(np.uint8))


def test_real_cifar10c_folder_is_used_instead_of_generating(tmp_path, monkeypatch):
    root = tmp_path / "CIFAR-10-C"
    _write_root(root, ["fog", "snow"])
    monkeypatch.setattr(cifar_c.C, "corrupt", lambda *a, **k: pytest.fail("generated instead of reading"))
    test = _split(n=4, c=3, size=32)
    cfg = {"corruptions": ["fog", "snow"], "corruptions_root": str(root)}
    sets = cifar_c.corruption_sets({"d": 1}, test, cfg, tmp_path)
    assert len(sets) == 10
    s3 = sets["c/snow/3"]
    raw = np.load(root / "snow.npy")[8:12]  # severity 3 = third block of 4
    np.testing.assert_array_equal(s3.images.permute(0, 2, 3, 1).numpy(), raw)
    assert s3.labels.dtype == torch.int64 and s3.labels.tolist() == [0, 1, 2, 3]
    assert s3.mean == test.mean  # normalised like the clean test set
    assert not (tmp_path / "corruptions").exists()


def test_real_folder_problems_are_explained(tmp_path):
    root = tmp_path / "c10c"
    _write_root(root, ["fog"])
    test = _split(n=4, c=3, size=32)
    with pytest.raises(DataError, match="lacks snow.npy"):
        cifar_c.corruption_sets(
            {}, test, {"corruptions": ["fog", "snow"], "corruptions_root": str(root)}, None
        )
    with pytest.raises(DataError, match="not a directory"):
        cifar_c.corruption_sets({}, test, {"corruptions_root": str(tmp_path / "nope")}, None)
    grey = _split(n=4, c=1, size=28)
    sets = cifar_c.corruption_sets({}, grey, {"corruptions": ["fog"], "corruptions_root": str(root)}, None)
    with pytest.raises(DataError, match=r"expected uint8 images \[5·M, 28, 28, 1\]"):
        sets["c/fog/1"]


def test_aggregates():
    m = {"top1": 80.0, "c/fog/1/top1": 70.0, "c/fog/2/top1": 50.0, "c/fog/2/nll": 3.0, "val/top1": 1.0}
    agg = cifar_c.corruption_aggregates(m)
    assert agg == {"corruption_acc": 60.0, "corruption_rel_drop": pytest.approx(25.0)}
    assert cifar_c.corruption_aggregates({"top1": 80.0}) == {}


def test_engine_sets_are_lazy_and_one_at_a_time(tmp_path):
    from kdbench.engine.evaluation import EvalContext, EvalSet

    class DS:
        def split(self, name):
            return _split(n=6)

    cell = _Cell(eval={"batch_size": 4, "corruptions": ["fog", "contrast"], "severities": [1]}, dataset={})
    sets = cifar_c.eval_set_provider(DS(), cell, tmp_path)
    assert list(sets) == ["c/fog/1", "c/contrast/1"] and all(isinstance(s, EvalSet) for s in sets.values())
    assert sets["c/fog/1"].key != sets["c/contrast/1"].key
    assert not (tmp_path / "corruptions").exists()  # nothing generated before it is used
    assert sets["c/fog/1"].targets().tolist() == (torch.arange(6) % 10).tolist()
    fog = [x for x, _, _ in sets["c/fog/1"].batches.iterate(None, False)]
    assert sum(len(x) for x in fog) == 6 and len(list((tmp_path / "corruptions").glob("*.pt"))) == 1
    [x for x, _, _ in sets["c/contrast/1"].batches.iterate(None, False)]
    assert cifar_c._LazySet._slot[0] == id(sets["c/contrast/1"].batches.data)  # only the last set is held
    assert cifar_c.eval_set_provider(DS(), None, tmp_path) == {}  # a teacher's own evaluation
    # the teacher's accuracy on corrupted sets only, and not in per-epoch evaluation
    y = torch.tensor([0, 1, 2, 3])
    t = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 5).float()
    fam = cifar_c.teacher_family
    assert fam(t, y, {}, t, EvalContext(set_name="c/fog/1")) == {"teacher_top1": 75.0}
    assert fam(t, y, {}, t, EvalContext(set_name="test")) == {}
    assert fam(t, y, {}, t, EvalContext(set_name="c/fog/1", cheap=True)) == {}


def test_a_dataset_can_point_at_a_real_folder(tmp_path, monkeypatch):
    root = tmp_path / "CIFAR-10-C"
    _write_root(root, list(CORRUPTIONS), m=2)
    monkeypatch.setattr(cifar_c.C, "corrupt", lambda *a, **k: pytest.fail("generated instead of reading"))

    class DS:
        corruptions_root = str(root)

        def split(self, name):
            return _split(n=2, c=3, size=32)

    sets = cifar_c.eval_set_provider(DS(), _Cell(eval={}, dataset={}), tmp_path)
    assert len(sets) == 75  # a root alone means every corruption at every severity
    x = next(sets["c/jpeg_compression/5"].batches.iterate(None, False))[0]
    assert x.shape == (2, 3, 32, 32)


def test_selection_of_the_extra_corruptions():
    # "all" stays the 15 of the mean; the release's four more come by name or as "extra"
    assert cifar_c.selected({"corruptions": "extra"})[0] == list(EXTRA)
    assert cifar_c.selected({"corruptions": ["all", "extra"]})[0] == list(ALL)
    assert cifar_c.selected({"corruptions": ["spatter", "fog", "fog"]})[0] == ["spatter", "fog"]
    with pytest.raises(ConfigError, match="'all', 'extra' or from: .*saturate"):
        cifar_c.selected({"corruptions": ["saturated"]})


def test_extra_corruptions_are_generated(tmp_path):
    test = _split(n=4, c=3, size=32)
    sets = cifar_c.corruption_sets({"d": 1}, test, {"corruptions": "extra", "severities": [3]}, tmp_path)
    assert list(sets) == [f"c/{n}/3" for n in EXTRA]
    for name in EXTRA:
        got = sets[f"c/{name}/3"].images.permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, corrupt(test.images.permute(0, 2, 3, 1).numpy(), name, 3))


def test_all_19_files_of_a_release_folder_are_read(tmp_path, monkeypatch):
    # the released layout: <name>.npy uint8 [5·M, 32, 32, 3] and labels.npy [5·M] uint8
    root = tmp_path / "CIFAR-10-C"
    _write_root(root, list(ALL), m=3)
    monkeypatch.setattr(cifar_c.C, "corrupt", lambda *a, **k: pytest.fail("generated instead of reading"))
    test = _split(n=3, c=3, size=32)
    cfg = {"corruptions": ["all", "extra"], "corruptions_root": str(root)}
    sets = cifar_c.corruption_sets({"d": 1}, test, cfg, None)
    assert len(sets) == 95
    for name in EXTRA:
        got = sets[f"c/{name}/5"]
        want = np.load(root / f"{name}.npy")[12:15]  # severity 5 = fifth block of 3
        np.testing.assert_array_equal(got.images.permute(0, 2, 3, 1).numpy(), want)
        assert got.labels.tolist() == [0, 1, 2] and sets.labels(f"c/{name}/5").tolist() == [0, 1, 2]
    lacking = tmp_path / "only15"
    _write_root(lacking, list(CORRUPTIONS), m=1)
    with pytest.raises(
        DataError, match="lacks speckle_noise.npy, gaussian_blur.npy, spatter.npy, saturate.npy"
    ):
        cifar_c.corruption_sets({}, test, cfg | {"corruptions_root": str(lacking)}, None)


def test_extra_sets_are_not_in_the_corruption_mean():
    m = {"top1": 80.0, "c/fog/1/top1": 70.0, "c/fog/2/top1": 50.0, "c/spatter/1/top1": 10.0}
    assert cifar_c.corruption_aggregates(m)["corruption_acc"] == 60.0
    assert cifar_c.corruption_aggregates({"top1": 80.0, "c/saturate/2/top1": 1.0}) == {}
