"""``waterbirds``: Waterbirds (Sagawa et al. 2020) from a local root, group_DRO / WILDS layout.

``<root>/metadata.csv`` has the columns ``img_filename`` (relative to the root), ``y``
(0 landbird, 1 waterbird), ``split`` (0 train, 1 val, 2 test) and ``place`` (0 land,
1 water); any other columns (img_id, place_filename) are ignored. WILDS' download
(``waterbirds_v1.0/``) and group_DRO's (``waterbird_complete95_forest2water2/``) both have
it. Groups: ``g = 2 * y + place``. Split 1 is the validation split (used by DFR).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from kdbench.datasets._grouped import GroupedImageFiles
from kdbench.errors import DataError

COLUMNS = ("img_filename", "y", "split", "place")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class Waterbirds(GroupedImageFiles):
    """Waterbirds: landbird / waterbird on land / water backgrounds; ``image_size`` default 64."""

    class_names = ["landbird", "waterbird"]
    attr_names = ["land", "water"]

    def _metadata(self) -> Path:
        assert self.root is not None
        for d in (self.root, self.root / "waterbirds_v1.0"):
            if (d / "metadata.csv").is_file():
                return d / "metadata.csv"
        raise DataError(
            f"waterbirds: {self.root}/metadata.csv not found; point `root:` at the folder with "
            "metadata.csv (columns img_filename, y, split, place) and the image folders"
        )

    def _image_dir(self) -> Path:
        return self._metadata().parent

    def _index(self) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
        path = self._metadata()
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}"
                )
            rows = list(reader)
        out: dict[str, tuple[list[str], list[int], list[int]]] = {s: ([], [], []) for s in SPLIT_CODES}
        code_to_split = {v: k for k, v in SPLIT_CODES.items()}
        for i, r in enumerate(rows, start=2):
            try:
                y, s, place = int(r["y"]), int(r["split"]), int(r["place"])
            except ValueError:
                raise DataError(f"{path}:{i}: y, split and place must be integers") from None
            if y not in (0, 1) or place not in (0, 1) or s not in code_to_split:
                raise DataError(f"{path}:{i}: y and place must be 0/1 and split 0/1/2, got {y}, {place}, {s}")
            paths, ys, places = out[code_to_split[s]]
            paths.append(r["img_filename"])
            ys.append(y)
            places.append(place)
        return {
            k: (p, np.array(y, dtype=np.int64), np.array(a, dtype=np.int64)) for k, (p, y, a) in out.items()
        }
