"""``spuco_birds``: a tiny tree in the layout the spuco package writes, read through the plugin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdbench.datasets.spuco import SpuCoBirds
from kdbench.engine.build import build_dataset
from kdbench.errors import DataError
from tests.conftest import kdbench_cli, write_grid

#: images per (class folder, background folder) in each split: majority groups are larger in
#: train and val, test is balanced (as in the release: 10000/500, 500/25, 500/500)
SIZES = {
    "train": {
        ("landbirds", "land"): 4,
        ("landbirds", "water"): 2,
        ("waterbirds", "land"): 2,
        ("waterbirds", "water"): 4,
    },
    "val": {
        ("landbirds", "land"): 2,
        ("landbirds", "water"): 1,
        ("waterbirds", "land"): 1,
        ("waterbirds", "water"): 2,
    },
    "test": {
        ("landbirds", "land"): 2,
        ("landbirds", "water"): 2,
        ("waterbirds", "land"): 2,
        ("waterbirds", "water"): 2,
    },
}


def colour(cls: str, bg: str, k: int) -> tuple[int, int, int]:
    """Red encodes the bird, green the background: the group is readable from the pixels."""
    return (220 if cls == "waterbirds" else 20, 220 if bg == "water" else 20, 10 * k)


def make_spuco_birds(root: Path) -> Path:
    """``<root>/spuco_birds/<split>/<landbirds|waterbirds>/<land|water>/<image>.jpg`` as SpuCoBirds
    downloads it (spuco's src/spuco/datasets/spuco_birds.py), plus files it must skip."""
    for split, groups in SIZES.items():
        for (cls, bg), n in groups.items():
            d = root / "spuco_birds" / split / cls / bg
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.new("RGB", (48, 40), colour(cls, bg, k)).save(d / f"{split}_{cls}_{bg}_{k}.jpg", "JPEG")
            (d / ".DS_Store").write_bytes(b"\0")
            (d / "notes.txt").write_text("not an image")
    return root


def test_reads_the_spuco_layout_with_groups_and_splits(tmp_path: Path):
    root = make_spuco_birds(tmp_path / "data")
    ds = build_dataset({"name": "spuco_birds", "params": {"root": str(root), "image_size": 16}})
    assert isinstance(ds, SpuCoBirds) and ds.splits == ("train", "val", "test") and ds.num_classes == 2
    info = ds.group_info()
    assert info.names == ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water"]
    assert info.n_groups == 4 and info.n_attr == 2
    order = [("landbirds", "land"), ("landbirds", "water"), ("waterbirds", "land"), ("waterbirds", "water")]
    for split, groups in SIZES.items():
        data, meta = ds.split(split), ds.meta(split)
        assert data.images.shape == (sum(groups.values()), 3, 16, 16)
        g = meta["group"]
        assert torch.bincount(g, minlength=4).tolist() == [groups[k] for k in order]
        # spuco's labels (landbirds 0, waterbirds 1) and spurious values (land 0, water 1)
        assert torch.equal(g, data.labels * 2 + meta["attr"])
        # the pixels agree with the labels: red = waterbird, green = water
        mean = data.images.float().mean((2, 3))
        assert torch.equal((mean[:, 0] > 120).long(), data.labels)
        assert torch.equal((mean[:, 1] > 120).long(), meta["attr"])
    # the root may also be the spuco_birds folder itself
    inner = SpuCoBirds(root=str(root / "spuco_birds"), image_size=16)
    assert torch.equal(inner.split("test").images, ds.split("test").images)


def test_limit_keeps_group_shares_and_fingerprint_follows_the_files(tmp_path: Path):
    root = make_spuco_birds(tmp_path / "data")
    limited = SpuCoBirds(root=str(root), image_size=8, limit=6)
    g = limited.meta("train")["group"]
    # 6 of train's 4/2/2/4: every group, the majority groups larger
    assert torch.bincount(g, minlength=4).tolist() == [2, 1, 1, 2]
    fp = SpuCoBirds(root=str(root), image_size=8).fingerprint()
    assert fp["sizes"] == {"train": 12, "val": 6, "test": 8}
    assert fp != limited.fingerprint()
    extra = root / "spuco_birds" / "test" / "waterbirds" / "land" / "extra.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(extra)
    again = SpuCoBirds(root=str(root), image_size=8)
    assert again.fingerprint()["files"] != fp["files"] and len(again.split("test")) == 9


def test_missing_or_incomplete_roots_say_what_is_wrong(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        SpuCoBirds(root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no train/, val/ or test/"):
        SpuCoBirds(root=str(tmp_path)).split("train")
    root = make_spuco_birds(tmp_path / "data")
    shutil.rmtree(root / "spuco_birds" / "val" / "waterbirds" / "land")
    with pytest.raises(DataError, match=r"val/waterbirds/land is missing"):
        SpuCoBirds(root=str(root)).split("train")
    (root / "spuco_birds" / "val" / "waterbirds" / "land").mkdir()
    with pytest.raises(DataError, match=r"val/waterbirds/land holds no images"):
        SpuCoBirds(root=str(root)).split("train")
    (root / "spuco_birds" / "val" / "waterbirds" / "land" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg cannot be decoded"):
        SpuCoBirds(root=str(root), image_size=8).split("train")


GRID = """
name: spuco
output: {out}
datasets:
  - {{spuco_birds: {{root: {root}, image_size: 16}}}}
pairs:
  - teacher: {{smallcnn: {{width: 4}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: [ce]
train: {{epochs: 1, batch_size: 8, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 64, val_fraction: 0.1}}
"""


@pytest.mark.slow
def test_a_grid_on_spuco_birds_reports_its_groups(tmp_path: Path):
    root = make_spuco_birds(tmp_path / "data")
    grid = write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs", root=root))
    r = kdbench_cli("run", str(grid), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr + r.stdout
    m = json.loads(next((tmp_path / "runs" / "spuco" / "cells").glob("*/result.json")).read_text())["metrics"]
    # its own val split (not a hold-out of train) and the balanced test, group by group
    assert m["group/waterbird_land/n"] == 2.0 and m["val/group/landbird_water/n"] == 1.0
    assert m["train/group/waterbird_water/n"] == 4.0 and "worst_group" in m
