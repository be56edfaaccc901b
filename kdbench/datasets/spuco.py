"""``spuco_birds``: SpuCo Birds (Joshi et al. 2023, the ``spuco`` package) from a local root.

The layout ``spuco.datasets.SpuCoBirds`` downloads and reads (``load_data`` in
``src/spuco/datasets/spuco_birds.py``)::

    <root>/spuco_birds/<split>/<class>/<background>/<image>

with ``<split>`` one of ``train``, ``val``, ``test``, ``<class>`` ``landbirds`` (label 0) or
``waterbirds`` (label 1) and ``<background>`` ``land`` (spurious 0) or ``water`` (spurious 1).
``root`` may be the folder that holds ``spuco_birds/`` (what ``SpuCoBirds(root=...)`` takes) or
``spuco_birds/`` itself. Groups are SpuCo's ``(label, spurious)`` pairs, numbered
``g = 2 * label + spurious`` (landbird_land, landbird_water, waterbird_land, waterbird_water).

The released data has 10,000 images in each majority group (landbirds on land, waterbirds on
water) and 500 in each minority group of ``train``; 500 / 25 in ``val``; 500 in every group of
``test`` (a balanced test). Unlike ``spuco``, which asserts those sizes, any number of images
per group is read (a subset still works), but every group of every split must have one.
Within a split the groups are interleaved in proportion to their sizes, so ``limit`` (the
first ``limit`` samples of each split) keeps the groups' shares as closely as its length allows.
Images are resized and centre-cropped to ``image_size`` (default 64) like Waterbirds; SpuCo
itself squashes to 256 x 256 and centre-crops 224.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from kdbench.datasets._grouped import GroupedImageFiles
from kdbench.errors import DataError

DATASET_DIR = "spuco_birds"
SPLITS = ("train", "val", "test")
#: (class folder, label) and (background folder, spurious value), in spuco's numbering
CLASS_DIRS = (("landbirds", 0), ("waterbirds", 1))
BACKGROUND_DIRS = (("land", 0), ("water", 1))


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMG_EXTENSIONS)


class SpuCoBirds(GroupedImageFiles):
    """SpuCo Birds: landbirds / waterbirds on land / water backgrounds; ``image_size`` default 64."""

    class_names = ["landbird", "waterbird"]
    attr_names = ["land", "water"]

    def _dir(self) -> Path:
        """The ``spuco_birds`` folder: ``<root>/spuco_birds`` or the root itself."""
        assert self.root is not None
        for d in (self.root / DATASET_DIR, self.root):
            if any((d / s).is_dir() for s in SPLITS):
                return d
        raise DataError(
            f"spuco_birds: no train/, val/ or test/ under {self.root / DATASET_DIR} or {self.root}; "
            f"point `root:` at the folder the spuco package downloaded into (it holds {DATASET_DIR}/"
            "<split>/{landbirds,waterbirds}/{land,water}/<image>)"
        )

    def _image_dir(self) -> Path:
        return self._dir()

    def _index(self) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
        base = self._dir()
        out = {}
        for split in SPLITS:
            paths: list[str] = []
            labels: list[int] = []
            spurious: list[int] = []
            position: list[float] = []
            for cls, y in CLASS_DIRS:
                for bg, a in BACKGROUND_DIRS:
                    d = base / split / cls / bg
                    if not d.is_dir():
                        raise DataError(
                            f"spuco_birds: {d} is missing; every split needs {cls}/land and {cls}/water "
                            "(the download is incomplete, or `root:` points at the wrong folder)"
                        )
                    files = sorted(p.name for p in d.iterdir() if _is_image(p))
                    if not files:
                        raise DataError(
                            f"spuco_birds: {d} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})"
                        )
                    paths.extend(f"{split}/{cls}/{bg}/{f}" for f in files)
                    labels.extend([y] * len(files))
                    spurious.extend([a] * len(files))
                    position.extend((i + 0.5) / len(files) for i in range(len(files)))
            # groups interleaved in proportion: any prefix (``limit``) keeps the group shares
            order = np.argsort(np.array(position), kind="stable")
            out[split] = (
                [paths[i] for i in order],
                np.array(labels, dtype=np.int64)[order],
                np.array(spurious, dtype=np.int64)[order],
            )
        return out
