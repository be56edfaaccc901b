"""``spurious``: any image dataset with a painted attribute correlated with the class.

Colored-MNIST / SpuCo style. Each sample gets an attribute value ``a`` in ``0..n_attr-1``,
painted as a coloured background (``kind: background``; greyscale bases become RGB, the
digit stays white on the colour; RGB bases are tinted) or a coloured square in the top-left
corner (``kind: patch``). Class ``y``'s *aligned* attribute is ``y % n_attr``. In the
``biased`` train split a sample carries its aligned attribute with probability ``strength``
and one of the others otherwise; the ``balanced`` variant (a robust teacher's data) gives
every class × attribute group the same share. The test split is ``balanced`` or
``reversed`` (no sample carries its aligned attribute); the other one is an extra eval set.

Groups follow group_DRO / WILDS: ``g = y * n_attr + a``. Everything is deterministic given
``seed`` (independent of the run's seed), and the normalisation statistics are those of the
balanced painting of the train split, so both variants are normalised the same way (a
teacher trained on one and applied to the other sees the same pixel scale).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from kdbench import registry
from kdbench.datasets._util import NormalizedImages, array_digest, channel_stats, check_split
from kdbench.datasets.base import GroupInfo, KDDataset
from kdbench.errors import DataError

#: well separated RGB colours (attribute values, in order)
PALETTE: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (230, 25, 75)),
    ("green", (60, 180, 75)),
    ("blue", (0, 130, 200)),
    ("yellow", (255, 225, 25)),
    ("magenta", (240, 50, 230)),
    ("cyan", (70, 240, 240)),
    ("orange", (245, 130, 48)),
    ("purple", (145, 30, 180)),
    ("lime", (210, 245, 60)),
    ("brown", (170, 110, 40)),
]
#: weight of the colour when tinting an RGB image (``background`` on colour bases)
TINT = 0.4


def _aligned(y: np.ndarray, n_attr: int) -> np.ndarray:
    return y % n_attr


def assign_attributes(y: np.ndarray, n_attr: int, mode: str, strength: float, seed: int) -> np.ndarray:
    """Attribute value per sample: ``biased`` (aligned with probability ``strength``),
    ``balanced`` (every class × attribute group equally, up to rounding) or ``reversed``
    (never aligned, the others equally)."""
    rng = np.random.default_rng(seed)
    a = np.empty(len(y), dtype=np.int64)
    aligned = _aligned(y, n_attr)
    if mode == "biased":
        keep = rng.random(len(y)) < strength
        # a uniformly chosen *other* value: aligned + 1..n_attr-1 (mod n_attr)
        shift = rng.integers(1, n_attr, size=len(y)) if n_attr > 1 else np.zeros(len(y), np.int64)
        a[:] = np.where(keep, aligned, (aligned + shift) % n_attr)
        return a
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        if mode == "balanced":
            a[idx] = (np.arange(len(idx)) + rng.integers(n_attr)) % n_attr
        else:  # reversed: round-robin over the non-aligned values
            others = np.array([v for v in range(n_attr) if v != c % n_attr])
            a[idx] = others[(np.arange(len(idx)) + rng.integers(len(others))) % len(others)]
    return a


def paint(images: torch.Tensor, attr: torch.Tensor, kind: str, patch_size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> uint8 RGB with attribute ``attr`` painted."""
    colours = torch.tensor([c for _, c in PALETTE], dtype=torch.float32)[attr]  # [N, 3]
    col = colours[:, :, None, None]
    x = images.float()
    if kind == "background":
        if images.shape[1] == 1:
            ink = x / 255.0  # the digit is white, the rest takes the colour
            out = ink * 255.0 + (1.0 - ink) * col
        else:
            out = (1.0 - TINT) * x + TINT * col
    else:
        out = x.expand(-1, 3, -1, -1).clone() if images.shape[1] == 1 else x.clone()
        out[:, :, :patch_size, :patch_size] = col
    return out.round().clamp(0, 255).to(torch.uint8)


def class_names(ds: Any) -> list[str]:
    """A dataset's class names when it knows them (``class_names()`` or ``classes``), else 0..K-1."""
    names = getattr(ds, "class_names", None) or getattr(ds, "classes", None)
    names = names() if callable(names) else names
    if names is None or len(names) != ds.num_classes:
        return [str(c) for c in range(ds.num_classes)]
    return [str(n) for n in names]


class Spurious(KDDataset):
    """A base dataset plugin with a painted spurious attribute (see the module docstring).

    ``base`` is a dataset name or ``{name: {params}}`` (built through the registry);
    ``val_fraction`` > 0 holds out that share of the base train split as a ``val`` split
    painted balanced (like Waterbirds' validation split), used by DFR.
    """

    in_channels = 3

    def __init__(
        self,
        root: str | None = None,
        base: str | dict[str, Any] = "mnist5k",
        kind: Literal["background", "patch"] = "background",
        strength: float = 0.95,
        n_attr: int = 2,
        variant: Literal["biased", "balanced"] = "biased",
        test: Literal["balanced", "reversed"] = "balanced",
        val_fraction: float = 0.0,
        patch_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__(None)
        if not 0.0 <= strength <= 1.0:
            raise DataError(f"spurious: strength must be in [0, 1], got {strength}")
        if not 2 <= n_attr <= len(PALETTE):
            raise DataError(f"spurious: n_attr must be in 2..{len(PALETTE)}, got {n_attr}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"spurious: val_fraction must be in [0, 1), got {val_fraction}")
        if isinstance(base, str):
            name, params = base, {}
        elif isinstance(base, dict) and len(base) == 1:
            name, params = next(iter(base.items()))
            params = dict(params or {})
        else:
            raise DataError(f"spurious: base must be a dataset name or {{name: {{params}}}}, got {base!r}")
        if name == "spurious":
            raise DataError("spurious: base cannot be spurious itself")
        if root is not None and "root" not in params:
            params["root"] = root
        self.base_name, self.base_params = str(name), params
        self.base = registry.load("datasets", self.base_name)(**params)
        self.num_classes = int(self.base.num_classes)
        self.image_size = int(self.base.image_size)
        if n_attr > self.num_classes:
            raise DataError(
                f"spurious: n_attr={n_attr} exceeds the {self.num_classes} classes of {name}; "
                "every attribute value needs a class it is aligned with"
            )
        self.kind, self.strength, self.n_attr = kind, float(strength), int(n_attr)
        self.variant, self.test, self.val_fraction, self.seed = variant, test, float(val_fraction), int(seed)
        self.patch_size = int(patch_size) if patch_size else max(2, self.image_size // 4)
        self.splits = ("train", "val", "test") if val_fraction > 0 else ("train", "test")
        self._built: dict[str, tuple[NormalizedImages, torch.Tensor]] | None = None

    # --- building
    def _base_arrays(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.base.split(split)
        images, labels = getattr(ds, "images", None), getattr(ds, "labels", None)
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and labels is not None):
            raise DataError(
                f"spurious: base dataset {self.base_name!r} must keep its images in memory as uint8 "
                "(mnist5k, digits, fashion_mnist, mnist, cifar10, cifar100 do)"
            )
        if images.shape[1] not in (1, 3):
            raise DataError(f"spurious: base images need 1 or 3 channels, got {images.shape[1]}")
        return images, labels.long()

    def _build(self) -> dict[str, tuple[NormalizedImages, torch.Tensor]]:
        if self._built is not None:
            return self._built
        tr_x, tr_y = self._base_arrays("train")
        te_x, te_y = self._base_arrays("test")
        val_idx = np.array([], dtype=np.int64)
        if self.val_fraction > 0:
            rng = np.random.default_rng(self.seed + 101)
            val_idx = np.sort(rng.permutation(len(tr_y))[: max(1, int(round(len(tr_y) * self.val_fraction)))])
        keep = np.setdiff1d(np.arange(len(tr_y)), val_idx)
        y_tr, y_te = tr_y[keep].numpy(), te_y.numpy()
        attrs = {
            "train": assign_attributes(y_tr, self.n_attr, self.variant, self.strength, self.seed),
            "test": assign_attributes(y_te, self.n_attr, self.test, self.strength, self.seed + 1),
        }
        other = "reversed" if self.test == "balanced" else "balanced"
        attrs[f"test_{other}"] = assign_attributes(y_te, self.n_attr, other, self.strength, self.seed + 2)
        raw = {"train": (tr_x[keep], tr_y[keep]), "test": (te_x, te_y), f"test_{other}": (te_x, te_y)}
        if len(val_idx):
            attrs["val"] = assign_attributes(
                tr_y[val_idx].numpy(), self.n_attr, "balanced", self.strength, self.seed + 3
            )
            raw["val"] = (tr_x[val_idx], tr_y[val_idx])
        # statistics of the balanced painting of the train split: the same for both variants
        stats_attr = assign_attributes(y_tr, self.n_attr, "balanced", self.strength, self.seed)
        mean, std = channel_stats(paint(tr_x[keep], torch.from_numpy(stats_attr), self.kind, self.patch_size))
        self._built = {}
        for name, (x, y) in raw.items():
            a = torch.from_numpy(attrs[name])
            self._built[name] = (NormalizedImages(paint(x, a, self.kind, self.patch_size), y, mean, std), a)
        return self._built

    # --- the dataset contract
    def split(self, name: str) -> Dataset:
        check_split(self, name, self.splits)
        return self._build()[name][0]

    def eval_splits(self) -> dict[str, Dataset]:
        return {k: v[0] for k, v in self._build().items() if k.startswith("test_")}

    def meta(self, split: str) -> dict[str, torch.Tensor]:
        built = self._build()
        if split not in built:
            raise DataError(f"dataset spurious has no split {split!r}; choose one of {sorted(built)}")
        ds, a = built[split]
        return {"attr": a, "group": ds.labels * self.n_attr + a}

    def group_info(self) -> GroupInfo:
        classes = class_names(self.base)
        attrs = [name for name, _ in PALETTE[: self.n_attr]]
        names = [f"{c}_{a}" for c in classes for a in attrs]
        return GroupInfo(n_groups=len(names), names=names, attr_names=attrs, n_attr=self.n_attr)

    def fingerprint(self) -> dict:
        built = self._build()
        return {
            **super().fingerprint(),
            "base": {"name": self.base_name, "fingerprint": self.base.fingerprint()},
            "params": {
                "kind": self.kind,
                "strength": self.strength,
                "n_attr": self.n_attr,
                "variant": self.variant,
                "test": self.test,
                "val_fraction": self.val_fraction,
                "patch_size": self.patch_size,
                "seed": self.seed,
            },
            "digest": array_digest(*(t for k in sorted(built) for t in (built[k][1], built[k][0].labels))),
        }
