"""The 19 CIFAR-10-C corruptions: shape/dtype/range, severity behaviour, determinism, and
agreement with the original generator (tests/fixtures/cifar_c_reference.npz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from kdbench.errors import ConfigError
from kdbench.robustness import corruptions as C
from kdbench.robustness.corruptions import (
    ALL,
    CORRUPTIONS,
    DETERMINISTIC,
    EXTRA,
    corrupt,
    frost_textures,
    motion_blur_batch,
)

REFERENCE = Path(__file__).parent / "fixtures" / "cifar_c_reference.npz"


def natural(n: int, size: int = 32, c: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth, mid-grey 'natural-like' uint8 images (mean about 0.45, std about 0.2)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=(n, size, size, c)), (0, 2, 2, 0)) * 6
    yy, xx = np.mgrid[0:size, 0:size] / size
    x += rng.uniform(-1, 1, (n, 1, 1, c)) * yy[None, :, :, None]
    x += rng.uniform(-1, 1, (n, 1, 1, c)) * xx[None, :, :, None]
    return (np.clip(0.45 + 0.2 * x, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return natural(24)


@pytest.fixture(scope="module")
def distances(images) -> dict[str, list[float]]:
    """Mean absolute pixel distance to the clean images, per corruption and severity."""
    out = {}
    for name in CORRUPTIONS:
        out[name] = [
            float(np.abs(corrupt(images, name, s, seed=3).astype(float) - images).mean()) for s in range(1, 6)
        ]
    return out


# every layout the module promises: colour/grey, 32/28, uint8/float, with/without channel axis
LAYOUTS = [
    ((4, 32, 32, 3), np.uint8),
    ((4, 28, 28, 1), np.uint8),
    ((4, 28, 28), np.uint8),
    ((4, 32, 32, 3), np.float32),
    ((4, 28, 28), np.float64),
]


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_range_intact(name):
    rng = np.random.default_rng(1)
    for shape, dtype in LAYOUTS:
        if dtype == np.uint8:
            x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            x = rng.random(shape).astype(dtype)
        for s in (1, 5):
            y = corrupt(x, name, s, seed=0)
            assert y.shape == x.shape and y.dtype == x.dtype, (name, shape, dtype, s)
            assert np.isfinite(y.astype(float)).all()
            hi = 255 if dtype == np.uint8 else 1.0
            assert y.min() >= 0 and y.max() <= hi, (name, shape, dtype, s)
            if name == "saturate" and s < 4 and (len(shape) == 3 or shape[-1] == 1):
                continue  # a grey pixel has saturation 0: severities 1-3 scale it, it stays grey
            assert not np.array_equal(y, x), f"{name} severity {s} left {shape} {dtype} unchanged"


# the eleven corruptions whose distance to the clean image grows strictly with severity in the reference
MONOTONE = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "zoom_blur",
    "snow",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
]


@pytest.mark.parametrize("name", MONOTONE)
def test_distance_grows_with_severity(name, distances):
    d = distances[name]
    assert all(a < b for a, b in zip(d, d[1:], strict=False)), (name, d)


def test_non_monotone_corruptions_behave_like_the_reference(distances):
    # elastic: severity 1 is mostly a random affine shift; the distance falls from 1 to 5
    # (1 and 2 are close: the affine spread falls 0.08 -> 0.07 while a weak elastic field starts)
    e = distances["elastic_transform"]
    assert e[0] > e[2] > e[3] > e[4] and e[1] > e[2] and e[0] > 1.3 * e[4], e
    # frost grows to severity 3, then falls as the image is darkened more (a: 1, 1, .9, .85, .75)
    f = distances["frost"]
    assert f[0] < f[1] < f[2] and f[2] > f[3] > f[4], f
    # glass: dips at 2->3 and 4->5; the two-iteration severities (4, 5) move pixels more than 1-3
    g = distances["glass_blur"]
    assert g[2] < g[1] and g[4] < g[3] and min(g[3:]) > max(g[:3]), g
    # motion: grows, except flat between 3 and 4 (same sigma 2, radius 6 -> 8)
    m = distances["motion_blur"]
    assert m[0] < m[1] < m[2] and m[3] < m[4] and abs(m[3] - m[2]) < 0.05 * m[2], m


def test_severity_one_is_mild_and_five_is_strong(distances, images):
    # a sanity bound: severity 5 of every corruption changes pixels by at least 2 grey levels on average
    assert all(d[4] > 2.0 for d in distances.values()), {k: v[4] for k, v in distances.items()}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_corruptions_ignore_the_seed(name, images):
    a = corrupt(images, name, 3, seed=0)
    b = corrupt(images, name, 3, seed=12345)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(set(ALL) - DETERMINISTIC))
def test_random_corruptions_are_reproducible_per_seed(name, images):
    a = corrupt(images, name, 4, seed=7)
    np.testing.assert_array_equal(a, corrupt(images, name, 4, seed=7))
    assert not np.array_equal(a, corrupt(images, name, 4, seed=8)), name


def test_images_are_corrupted_independently_of_the_batch_for_deterministic_ops(images):
    for name in sorted(DETERMINISTIC):
        whole = corrupt(images, name, 2)
        np.testing.assert_array_equal(whole[:5], corrupt(images[:5], name, 2))


def test_brightness_greyscale_is_grey_of_colour():
    x = natural(6, 28, 1)
    rgb = np.repeat(x, 3, axis=-1)
    for s in range(1, 6):
        g = corrupt(x, "brightness", s)
        c = corrupt(rgb, "brightness", s)
        np.testing.assert_array_equal(np.repeat(g, 3, axis=-1), c)


def test_motion_blur_is_a_line_along_the_angle():
    x = np.zeros((2, 32, 32, 1))
    x[:, 16, 16] = 1.0
    # taps read pixels at +offset along the angle: a point spreads to the opposite side
    out = motion_blur_batch(x, radius=6, sigma=3, angles=np.array([0.0, 90.0]))
    row = out[0, 16, :, 0]
    assert out[0].sum() == pytest.approx(1.0) and np.count_nonzero(out[0]) == 13
    assert row[4:17].all() and not row[17:].any() and not row[:4].any()
    col = out[1, :, 16, 0]
    assert col[4:17].all() and not col[17:].any() and not col[:4].any()
    assert row[16] > row[10] > row[4]  # Gaussian weights fall with the tap index


def test_frost_textures_are_fixed_and_frost_like():
    t = frost_textures()
    assert t.shape == (5, 128, 128, 3) and not t.flags.writeable
    frost_textures.cache_clear()
    np.testing.assert_array_equal(t, frost_textures())  # regenerated from the same seeds
    assert 0.55 < t.mean() < 0.75 and t[..., 2].mean() > t[..., 0].mean()  # light and bluish
    assert not np.array_equal(t[0], t[1])


def test_bad_arguments_are_explained():
    x = np.zeros((1, 8, 8), np.uint8)
    with pytest.raises(ConfigError, match="unknown corruption 'fogg'"):
        corrupt(x, "fogg", 1)
    with pytest.raises(ConfigError, match="severity"):
        corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.astype(np.int32), "fog", 1)


# --------------------------------------------------------------------------- the reference's values


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """Outputs of hendrycks/robustness make_cifar_c.py (see tests/fixtures/cifar_c_reference.md)."""
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


def test_reference_fixture_records_its_origin(reference):
    meta = json.loads(str(reference["meta"]))
    assert len(meta["commit"]) == 40 and "make_cifar_c.py" in meta["reference"]
    assert meta["command"].startswith("python tools/make_cifar_c_fixture.py")
    assert reference["clean"].shape == (8, 32, 32, 3) and reference["clean"].dtype == np.uint8
    assert {k[4:] for k in reference if k.startswith("out/")} == DETERMINISTIC
    assert {k[5:] for k in reference if k.startswith("dist/")} == set(ALL) - DETERMINISTIC


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_corruptions_match_the_reference_value_for_value(name, reference):
    # pixelate (float BOX instead of uint8 BOX), brightness 4 (off by one level on 3.7 %)
    # and saturate (no such corruption) failed here before
    clean = reference["clean"]
    for s in range(1, 6):
        ours = corrupt(clean, name, s).astype(int)
        diff = np.abs(ours - reference[f"out/{name}"][s - 1])
        same = float((diff == 0).mean())
        assert diff.max() <= 1 and same >= 0.99, f"{name} {s}: max {diff.max()}, {100 * same:.2f} % equal"


@pytest.mark.parametrize("name", sorted(set(ALL) - DETERMINISTIC))
def test_random_corruptions_match_the_reference_within_its_seed_spread(name, reference):
    # the reference's mean |Δ| to the clean images over 20 seeds, against ours over 4 seeds;
    # glass_blur (a swap where the reference copies) was 11-23 standard deviations off
    clean = reference["clean"].astype(float)
    ref = reference[f"dist/{name}"]
    for s in range(1, 6):
        ours = np.mean(
            [np.abs(corrupt(reference["clean"], name, s, seed=k) - clean).mean() for k in range(4)]
        )
        mean, sd = ref[s - 1].mean(), ref[s - 1].std()
        assert abs(ours - mean) <= 3 * sd, f"{name} {s}: ours {ours:.3f}, reference {mean:.3f} ± {sd:.3f}"


class _Offsets:
    """A generator stand-in whose ``integers`` returns one fixed offset everywhere."""

    def __init__(self, value: int):
        self.value = value

    def integers(self, low, high, size):
        return np.full(size, self.value)


def test_glass_blur_copies_the_neighbour_as_the_reference_does():
    # severity 1 (sigma 0.05) blurs nothing; every offset (-1, -1): the reference's loop, bottom
    # right first, copies x[h-1, w-1] onto x[h, w] for h, w in 31..2 and never writes x[h-1, w-1]
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)) / 255.0
    out = C._glass_blur(x, 1, _Offsets(-1))
    want = x.copy()
    want[:, 2:32, 2:32] = x[:, 1:31, 1:31]
    np.testing.assert_allclose(out, want, atol=1e-12)


def test_extra_corruptions_are_the_four_of_the_release():
    assert EXTRA == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert ALL == CORRUPTIONS + EXTRA and len(CORRUPTIONS) == 15 and not set(EXTRA) & set(CORRUPTIONS)
