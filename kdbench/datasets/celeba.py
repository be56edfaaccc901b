"""``celeba``: CelebA from a local root in torchvision's layout, with a target and a confounder.

``<root>`` (or ``<root>/celeba``) holds ``list_attr_celeba.txt`` (a count line, a line of the
40 attribute names, then ``<file> ±1 ...`` per image), ``list_eval_partition.txt``
(``<file> 0|1|2``: train / val / test) and ``img_align_celeba/``. The class is ``target``
(default ``Blond_Hair``), the attribute ``confounder`` (default ``Male``), as in group_DRO;
groups ``g = 2 * y + a``. Images are centre-cropped and resized to ``image_size`` (64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdbench.datasets._grouped import GroupedImageFiles
from kdbench.errors import DataError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class CelebA(GroupedImageFiles):
    """CelebA faces: binary ``target`` attribute, binary ``confounder`` attribute as the group."""

    def __init__(
        self,
        root: str | None = None,
        target: str = "Blond_Hair",
        confounder: str = "Male",
        image_size: int = 64,
        limit: int | None = None,
    ):
        super().__init__(root, image_size, limit)
        if target == confounder:
            raise DataError(f"celeba: target and confounder are both {target!r}; pick two attributes")
        self.target, self.confounder = target, confounder
        self.class_names = [f"not_{target}", target]
        self.attr_names = [f"not_{confounder}", confounder]

    def _dir(self) -> Path:
        assert self.root is not None
        for d in (self.root, self.root / "celeba"):
            if (d / "list_attr_celeba.txt").is_file():
                return d
        raise DataError(
            f"celeba: list_attr_celeba.txt not found in {self.root} or {self.root}/celeba; expected "
            "torchvision's layout (list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/)"
        )

    def _image_dir(self) -> Path:
        return self._dir() / "img_align_celeba"

    def _attributes(self) -> tuple[list[str], list[str], np.ndarray]:
        path = self._dir() / "list_attr_celeba.txt"
        lines = path.read_text().splitlines()
        if len(lines) < 2:
            raise DataError(f"{path}: expected a count line and a header line of attribute names")
        header = lines[1].split()
        files, values = [], []
        for i, line in enumerate(lines[2:], start=3):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != len(header) + 1:
                raise DataError(
                    f"{path}:{i}: expected a file name and {len(header)} values, got {len(parts) - 1}"
                )
            files.append(parts[0])
            try:
                values.append([int(v) for v in parts[1:]])
            except ValueError:
                raise DataError(f"{path}:{i}: attribute values must be 1 or -1") from None
        return header, files, np.array(values, dtype=np.int64).reshape(len(files), len(header))

    def _index(self) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
        header, files, values = self._attributes()
        for name in (self.target, self.confounder):
            if name not in header:
                raise DataError(f"celeba: no attribute {name!r}; available: {', '.join(header)}")
        y = (values[:, header.index(self.target)] > 0).astype(np.int64)
        a = (values[:, header.index(self.confounder)] > 0).astype(np.int64)
        part_path = self._dir() / "list_eval_partition.txt"
        if not part_path.is_file():
            raise DataError(f"celeba: {part_path} not found")
        partition: dict[str, int] = {}
        for i, line in enumerate(part_path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(f"{part_path}:{i}: expected '<file> 0|1|2', got {line!r}")
            partition[parts[0]] = int(parts[1])
        out = {}
        for split, code in SPLIT_CODES.items():
            idx = [i for i, f in enumerate(files) if partition.get(f) == code]
            out[split] = ([files[i] for i in idx], y[idx], a[idx])
        unassigned = [f for f in files if f not in partition]
        if unassigned:
            raise DataError(
                f"{part_path}: {len(unassigned)} image(s) have no partition, e.g. {unassigned[0]}"
            )
        return out

    def _params(self) -> dict:
        return {**super()._params(), "target": self.target, "confounder": self.confounder}
