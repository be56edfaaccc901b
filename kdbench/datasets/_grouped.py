"""Shared base of image-file datasets with groups (Waterbirds, CelebA).

Images are decoded once, resized (shorter side to ``size * 256 / 224``, then centre-cropped
to ``size``, as group_DRO does at 224) and cached as uint8 arrays with a checksum, so later
runs load one file instead of thousands of JPEGs. The cache sits in ``<root>/.kdbench-cache``
when the root is writable, else in ``~/.cache/kdbench``.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from kdbench.artifacts import ArtifactCorrupt, load_checked, save_checked
from kdbench.datasets._util import NormalizedImages, array_digest, channel_stats, check_split
from kdbench.datasets.base import GroupInfo, KDDataset
from kdbench.errors import DataError

#: one split's arrays: uint8 images [N, 3, S, S], labels [N], attribute values [N]
Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def decode_image(path: Path, size: int) -> np.ndarray:
    """An image file -> uint8 ``[3, size, size]`` (RGB, resized and centre-cropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            short = max(1, int(round(size * 256 / 224)))
            scale = short / min(w, h)
            im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise DataError(f"image {path} listed in the metadata is missing") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"image {path} cannot be decoded ({e}); the file is damaged") from None


class GroupedImageFiles(KDDataset):
    """Images listed in a metadata file, with a binary target and one attribute.

    Subclasses give ``_index()``: split -> (relative image paths, labels, attribute values),
    plus ``class_names`` and ``attr_names`` (names of the attribute's values).
    """

    needs_root: ClassVar[bool] = True
    num_classes: ClassVar[int] = 2
    in_channels: ClassVar[int] = 3
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    class_names: list[str]
    attr_names: list[str]

    def __init__(self, root: str | None = None, image_size: int = 64, limit: int | None = None):
        super().__init__(root)
        if image_size < 4:
            raise DataError(f"image_size must be at least 4, got {image_size}")
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive number of samples per split, got {limit}")
        self.image_size = int(image_size)  # per instance: configurable
        self.limit = limit
        self._arrays: dict[str, Arrays] | None = None
        self._splits: dict[str, NormalizedImages] | None = None

    # --- subclass hooks
    def _index(self) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def _image_dir(self) -> Path:
        assert self.root is not None
        return self.root

    def _index_limited(self) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
        out = {}
        for split, (paths, y, a) in self._index().items():
            n = len(paths) if self.limit is None else min(self.limit, len(paths))
            out[split] = (paths[:n], y[:n], a[:n])
        return out

    def _cache_path(self, index: dict) -> Path:
        h = hashlib.sha1(
            repr(sorted((k, v[0], v[1].tolist(), v[2].tolist()) for k, v in index.items())).encode()
        )
        name = f"{type(self).__name__.lower()}_{self.image_size}_{h.hexdigest()[:16]}.pt"
        assert self.root is not None
        local = self.root / ".kdbench-cache"
        if os.access(self.root, os.W_OK):
            return local / name
        return Path(os.environ.get("KDBENCH_CACHE", Path.home() / ".cache" / "kdbench")) / name

    def arrays(self) -> dict[str, Arrays]:
        """Split -> (uint8 images, labels, attributes), from the cache or decoded now."""
        if self._arrays is not None:
            return self._arrays
        index = self._index_limited()
        cache = self._cache_path(index)
        if cache.exists():
            try:
                self._arrays = {k: tuple(v) for k, v in load_checked(cache).items()}  # type: ignore[misc]
                return self._arrays
            except (ArtifactCorrupt, RuntimeError, OSError):
                cache.unlink(missing_ok=True)  # rebuilt below
        out: dict[str, Arrays] = {}
        img_dir = self._image_dir()
        for split, (paths, y, a) in index.items():
            if len(paths) == 0:
                raise DataError(
                    f"{type(self).__name__}: split {split!r} is empty in the metadata under {self.root}"
                )
            with ThreadPoolExecutor(
                max_workers=min(8, os.cpu_count() or 1)
            ) as pool:  # PIL decodes without the GIL
                images = np.stack(list(pool.map(lambda p: decode_image(img_dir / p, self.image_size), paths)))
            out[split] = (
                torch.from_numpy(images),
                torch.from_numpy(y.astype(np.int64)),
                torch.from_numpy(a.astype(np.int64)),
            )
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_checked({k: list(v) for k, v in out.items()}, cache)
        except OSError:
            pass  # a cache we cannot write only costs time
        self._arrays = out
        return out

    def _built(self) -> dict[str, NormalizedImages]:
        if self._splits is None:
            arr = self.arrays()
            mean, std = channel_stats(arr["train"][0])
            self._splits = {k: NormalizedImages(x, y, mean, std) for k, (x, y, _) in arr.items()}
        return self._splits

    # --- the dataset contract
    def split(self, name: str) -> Dataset:
        check_split(self, name, self.splits)
        return self._built()[name]

    def meta(self, split: str) -> dict[str, torch.Tensor]:
        check_split(self, split, self.splits)
        _, y, a = self.arrays()[split]
        return {"attr": a, "group": y * len(self.attr_names) + a}

    def group_info(self) -> GroupInfo:
        names = [f"{c}_{a}" for c in self.class_names for a in self.attr_names]
        return GroupInfo(
            n_groups=len(names), names=names, attr_names=list(self.attr_names), n_attr=len(self.attr_names)
        )

    def _params(self) -> dict:
        return {"image_size": self.image_size, "limit": self.limit}

    def fingerprint(self) -> dict:
        index = self._index_limited()
        labels = [t for k in sorted(index) for t in (index[k][1], index[k][2])]
        return {
            **super().fingerprint(),
            "params": self._params(),
            "sizes": {k: len(v[0]) for k, v in index.items()},
            "digest": array_digest(*labels),
            "files": hashlib.sha1(
                "\n".join(p for k in sorted(index) for p in index[k][0]).encode()
            ).hexdigest()[:16],
        }
