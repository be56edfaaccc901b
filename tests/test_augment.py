"""Batch augmenters: shapes, determinism from the generator, and what each op does."""

from __future__ import annotations

import pytest
import torch

from kdbench.augment.basic import FlipCrop, Identity, RandAugmentView
from kdbench.errors import ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 8, c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=gen(123))


@pytest.mark.parametrize(
    "aug",
    [
        Identity(),
        FlipCrop(),
        FlipCrop(flip=False, padding=2),
        RandAugmentView(),
        RandAugmentView(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.3]),
    ],
)
def test_shape_dtype_kept_input_untouched_and_deterministic(aug) -> None:
    x = batch()
    before = x.clone()
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(x, before)
    assert torch.equal(a, b)
    if not isinstance(aug, Identity):
        assert not torch.equal(a, c)


def test_identity_returns_the_batch() -> None:
    x = batch()
    assert Identity()(x, gen()) is x


def test_flipcrop_flips_and_crops_a_constructed_image() -> None:
    # each pixel holds its own column (channel 0) and row (channel 1) index + 1; 0 is padding
    h = w = 8
    cols = torch.arange(1, w + 1, dtype=torch.float32).expand(h, w)
    rows = torch.arange(1, h + 1, dtype=torch.float32).view(h, 1).expand(h, w)
    x = torch.stack([cols, rows]).expand(64, 2, h, w).contiguous()
    out = FlipCrop(padding=2)(x, gen(5))
    seen_flip = seen_shift = False
    for img in out:
        c, r = img[0], img[1]
        inside = (c > 0) & (r > 0)
        assert inside.any()
        # inside the image, columns step by +1 (unflipped) or -1 (flipped) along a row, rows by +1 down
        dc = (c[:, 1:] - c[:, :-1])[inside[:, 1:] & inside[:, :-1]]
        dr = (r[1:] - r[:-1])[inside[1:] & inside[:-1]]
        assert (dr == 1).all()
        assert (dc == 1).all() or (dc == -1).all()
        seen_flip |= bool((dc == -1).all())
        # a shift by (sy, sx) moves the origin pixel and fills the border with zeros
        seen_shift |= bool((~inside).any())
        assert ((c == 0) == (r == 0)).all()  # padding is zero in every channel at once
        padded_rows = int((~inside).all(1).sum())
        padded_cols = int((~inside).all(0).sum())
        assert padded_rows <= 2 and padded_cols <= 2
    assert seen_flip and seen_shift


def test_flipcrop_without_flip_never_mirrors_and_zero_padding_only_flips() -> None:
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(32, 1, 1, 1)
    out = FlipCrop(flip=False, padding=1)(x, gen())
    for img in out[:, 0]:
        nz = img[img != 0]
        assert (nz[1:] > nz[:-1]).all()  # row-major order kept: nothing mirrored
    flipped = FlipCrop(padding=0)(x, gen())
    assert all(torch.equal(o, x[0]) or torch.equal(o, x[0].flip(-1)) for o in flipped)
    assert any(torch.equal(o, x[0].flip(-1)) for o in flipped)


def test_randaugment_changes_images_keeps_range_and_global_rng() -> None:
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    unit = torch.rand(16, 3, 16, 16, generator=gen(7))
    x = (unit - 0.5) / 0.25
    torch.manual_seed(99)
    state = torch.get_rng_state()
    out = RandAugmentView(mean=mean, std=std)(x, gen(3))
    assert torch.equal(torch.get_rng_state(), state)
    changed = [(o - i).abs().max() > 1e-3 for o, i in zip(out, x, strict=True)]
    assert sum(changed) >= 12
    back = out * 0.25 + 0.5
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    # without mean/std: per-sample min/max mapping stays within the sample's own range
    out2 = RandAugmentView()(x, gen(3))
    assert (out2.amin((1, 2, 3)) >= x.amin((1, 2, 3)) - 1e-4).all()
    assert (out2.amax((1, 2, 3)) <= x.amax((1, 2, 3)) + 1e-4).all()


def test_randaugment_grayscale_and_zero_ops() -> None:
    x = batch(c=1, h=28, w=28)
    assert RandAugmentView()(x, gen()).shape == x.shape
    assert torch.allclose(RandAugmentView(num_ops=0)(x, gen()), x, atol=1e-5)


def test_bad_params_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="padding"):
        FlipCrop(padding=-1)
    with pytest.raises(ConfigError, match="magnitude"):
        RandAugmentView(magnitude=31)
    with pytest.raises(ConfigError, match="both `mean` and `std`"):
        RandAugmentView(mean=[0.5])
    with pytest.raises(ConfigError, match="3 channels"):
        RandAugmentView(mean=[0.5], std=[0.2])(batch(), gen())
    with pytest.raises(ValueError, match=r"float batch \[B, C, H, W\]"):
        FlipCrop()(torch.zeros(3, 8, 8), gen())
