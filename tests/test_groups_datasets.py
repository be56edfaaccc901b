"""Group datasets: spurious (painted attribute), Waterbirds and CelebA from tiny local trees."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdbench.datasets.celeba import CelebA
from kdbench.datasets.spurious import PALETTE, TINT, Spurious, assign_attributes, paint
from kdbench.datasets.waterbirds import Waterbirds
from kdbench.errors import DataError

# ----------------------------------------------------------------------------- spurious


def test_biased_attributes_follow_strength_and_balanced_ones_are_equal():
    y = np.repeat(np.arange(4), 500)
    a = assign_attributes(y, 2, "biased", 0.9, seed=0)
    aligned = (a == y % 2).mean()
    assert 0.87 < aligned < 0.93
    b = assign_attributes(y, 2, "balanced", 0.9, seed=0)
    counts = np.bincount(y * 2 + b, minlength=8)
    assert counts.max() - counts.min() <= 1
    r = assign_attributes(y, 4, "reversed", 0.9, seed=0)
    assert not (r == y % 4).any()
    assert set(np.bincount(y * 4 + r, minlength=16)[[1, 2, 3]]) <= {166, 167}


def test_paint_background_keeps_ink_white_and_patch_fills_corner():
    img = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    img[:, :, 4, 4] = 255
    out = paint(img, torch.tensor([0, 1]), "background", 2)
    assert out.shape == (2, 3, 8, 8)
    assert out[0, :, 0, 0].tolist() == list(PALETTE[0][1])
    assert out[1, :, 0, 0].tolist() == list(PALETTE[1][1])
    assert out[0, :, 4, 4].tolist() == [255, 255, 255]
    rgb = torch.full((1, 3, 8, 8), 7, dtype=torch.uint8)
    p = paint(rgb, torch.tensor([2]), "patch", 3)
    assert p[0, :, 1, 1].tolist() == list(PALETTE[2][1]) and p[0, :, 5, 5].tolist() == [7, 7, 7]
    # colour bases are tinted everywhere: TINT of the colour over the image
    t = paint(rgb, torch.tensor([2]), "background", 3)
    expect = [round((1 - TINT) * 7 + TINT * c) for c in PALETTE[2][1]]
    assert t[0, :, 5, 5].tolist() == expect


@pytest.fixture(scope="module")
def spurious_digits():
    return Spurious(base={"digits": {}}, strength=0.9, n_attr=2)


def test_spurious_groups_meta_and_eval_sets(spurious_digits):
    ds = spurious_digits
    info = ds.group_info()
    assert info.n_groups == 20 and info.n_attr == 2 and info.names[3] == "1_green"
    tr = ds.split("train")
    meta = ds.meta("train")
    assert len(meta["group"]) == len(tr) and tr.images.shape[1] == 3
    assert torch.equal(meta["group"], tr.labels * 2 + meta["attr"])
    # the train correlation is the configured strength
    assert 0.85 < float((meta["attr"] == tr.labels % 2).double().mean()) < 0.95
    test_counts = torch.bincount(ds.meta("test")["group"], minlength=20).view(10, 2)
    assert (test_counts.max(1).values - test_counts.min(1).values).max() <= 1  # balanced within classes
    assert list(ds.eval_splits()) == ["test_reversed"]
    rev = ds.meta("test_reversed")
    assert not (rev["attr"] == ds.eval_splits()["test_reversed"].labels % 2).any()


def test_spurious_normalisation_and_variants_share_stats(spurious_digits):
    x = spurious_digits.split("train").tensors[0]
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=0.1)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=0.1)
    bal = Spurious(base={"digits": {}}, strength=0.9, n_attr=2, variant="balanced")
    assert bal.split("train").mean == spurious_digits.split("train").mean
    counts = torch.bincount(bal.meta("train")["group"], minlength=20).view(10, 2)
    assert (counts.max(1).values - counts.min(1).values).max() <= 1
    # the same test images and attributes: a teacher trained on one variant is tested like the other
    assert torch.equal(bal.split("test").images, spurious_digits.split("test").images)


def test_spurious_is_deterministic_and_seed_changes_it(spurious_digits):
    again = Spurious(base={"digits": {}}, strength=0.9, n_attr=2)
    assert torch.equal(again.meta("train")["attr"], spurious_digits.meta("train")["attr"])
    assert again.fingerprint() == spurious_digits.fingerprint()
    other = Spurious(base={"digits": {}}, strength=0.9, n_attr=2, seed=1)
    assert not torch.equal(other.meta("train")["attr"], spurious_digits.meta("train")["attr"])
    assert other.fingerprint() != spurious_digits.fingerprint()


def test_spurious_val_split_and_errors():
    ds = Spurious(base="digits", n_attr=3, val_fraction=0.2, kind="patch", test="reversed")
    assert ds.splits == ("train", "val", "test")
    assert len(ds.split("val")) + len(ds.split("train")) == len(ds.base.split("train"))
    assert list(ds.eval_splits()) == ["test_balanced"]
    assert len(ds.meta("val")["group"]) == len(ds.split("val"))
    with pytest.raises(DataError, match="n_attr"):
        Spurious(base="digits", n_attr=11)
    with pytest.raises(DataError, match="strength"):
        Spurious(base="digits", strength=1.5)


# ----------------------------------------------------------------------------- waterbirds


def _jpeg(path: Path, colour: tuple[int, int, int], size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def make_waterbirds(root: Path) -> Path:
    """group_DRO's layout: metadata.csv + <class dir>/<image>.jpg; 3 images per (split, y, place)."""
    rows = []
    i = 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for k in range(3):
                    fn = f"{y:03d}.Bird_{y}/img_{i}.jpg"
                    _jpeg(root / fn, (200 * y, 200 * place, 10 * k))
                    rows.append(
                        {
                            "img_id": i,
                            "img_filename": fn,
                            "y": y,
                            "split": split,
                            "place": place,
                            "place_filename": f"/x/{i}.jpg",
                        }
                    )
                    i += 1
    with (root / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_waterbirds_reads_layout_groups_and_caches(tmp_path: Path):
    root = make_waterbirds(tmp_path / "wb")
    ds = Waterbirds(root=str(root), image_size=16)
    assert ds.splits == ("train", "val", "test")
    tr = ds.split("train")
    assert tr.images.shape == (12, 3, 16, 16)
    g = ds.meta("train")["group"]
    assert torch.equal(torch.bincount(g, minlength=4), torch.tensor([3, 3, 3, 3]))
    assert ds.group_info().names == ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water"]
    # colour encodes (y, place): group 3 is (200, 200, *)
    x = tr.images[g == 3].float().mean((0, 2, 3))
    assert x[0] > 150 and x[1] > 150
    assert list((root / ".kdbench-cache").glob("*.pt"))
    again = Waterbirds(root=str(root), image_size=16)
    assert torch.equal(again.split("test").images, ds.split("test").images)
    assert again.fingerprint() == ds.fingerprint()


def test_waterbirds_errors(tmp_path: Path):
    with pytest.raises(DataError, match="metadata.csv"):
        Waterbirds(root=str(tmp_path)).split("train")
    (tmp_path / "metadata.csv").write_text("img_filename,y,split\na.jpg,0,0\n")
    with pytest.raises(DataError, match="place"):
        Waterbirds(root=str(tmp_path)).split("train")
    (tmp_path / "metadata.csv").write_text(
        "img_filename,y,split,place\na.jpg,0,0,0\nb.jpg,1,1,0\nc.jpg,1,2,1\n"
    )
    with pytest.raises(DataError, match="missing"):
        Waterbirds(root=str(tmp_path)).split("train")


# ----------------------------------------------------------------------------- celeba


def make_celeba(root: Path, n: int = 24) -> Path:
    """torchvision's layout: list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/."""
    d = root / "celeba"
    names = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Smiling"]
    lines = [str(n), " ".join(names)]
    parts = []
    for i in range(n):
        fn = f"{i + 1:06d}.jpg"
        blond, male = i % 2, (i // 2) % 2
        _jpeg(d / "img_align_celeba" / fn, (255 * blond, 0, 255 * male), size=(178, 218))
        vals = [1 if v else -1 for v in (0, blond, male, i % 3 == 0)]
        lines.append(fn + " " + " ".join(f"{v:2d}" for v in vals))
        parts.append(f"{fn} {i * 3 // n}")
    (d / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (d / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


def test_celeba_target_confounder_and_splits(tmp_path: Path):
    root = make_celeba(tmp_path / "c")
    ds = CelebA(root=str(root), image_size=8)
    tr = ds.split("train")
    assert len(tr) == 8 and len(ds.split("val")) == 8 and len(ds.split("test")) == 8
    assert tr.labels.tolist() == [i % 2 for i in range(8)]
    assert ds.meta("train")["attr"].tolist() == [(i // 2) % 2 for i in range(8)]
    assert ds.group_info().names[3] == "Blond_Hair_Male"
    other = CelebA(root=str(root), target="Smiling", confounder="Blond_Hair", image_size=8)
    assert other.split("train").labels.tolist() == [int(i % 3 == 0) for i in range(8)]
    assert other.fingerprint() != ds.fingerprint()
    with pytest.raises(DataError, match="no attribute 'Bald'"):
        CelebA(root=str(root), target="Bald").split("train")
