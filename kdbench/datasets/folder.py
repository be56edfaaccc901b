"""ImageNet-style folders: ``root/<split>/<class name>/<image>``, loaded lazily from disk.

Splits are the ``train`` and ``val`` subdirectories; ``test`` reads ``test/`` when there is
one and ``val/`` otherwise (ImageNet's labelled evaluation split is ``val``). With both
``val/`` and ``test/``, ``val`` is a validation split of its own (``splits`` lists it), used
when the grid asks for validation (``eval.val_fraction``) instead of holding out training
images. Class indices come from the sorted class directories of ``train/`` and are used for
every split, so a split that lacks a class does not shift the labels of the others.

Spurious-only images (the spurious ImageNet protocol, Neuhaus et al. 2023): a folder
``<root>/spurious_images/<class name>/<image>`` beside the splits holds, per class, images that
show only a feature the class is spuriously associated with. They form the extra evaluation set
``spurious`` (labels: the class whose feature they show; metadata ``spurious_only``), from
which :mod:`kdbench.robustness.spurious_auc` computes the spurious mAUC against ``test``. A
sub-folder may instead be named as in the Spurious ImageNet release, whose reader takes the
class index from the third ``_``-separated field and the feature's component from the last
(several components of one class are one class here); indices are those of the sorted
``train/`` classes, i.e. torchvision's ImageNet indices when ``train/`` holds the 1000 wnids.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from kdbench.datasets._util import check_split
from kdbench.datasets.base import KDDataset
from kdbench.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPURIOUS_DIR = "spurious_images"
SPURIOUS_SET = "spurious"


class _ClassFolder(ImageFolder):
    """An ImageFolder whose class -> index map is given (the train split's), not rediscovered."""

    def __init__(self, root: Path, class_to_idx: dict[str, int], transform: v2.Transform):
        self._given = class_to_idx
        super().__init__(str(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._given), dict(self._given)


class ImageFolderDataset(KDDataset):
    """A class-per-subfolder image tree (ImageNet layout), RGB, resized and centre-cropped.

    Each image is resized so its short side is ``resize`` (default ``image_size / 0.875``,
    i.e. 256 for 224), centre-cropped to ``image_size`` and normalised with the ImageNet
    mean/std. Random crops and flips are the augmenters' job, on batches.
    """

    in_channels: ClassVar[int] = 3
    needs_root: ClassVar[bool] = True
    #: the split subdirectory to read for each split name, in order of preference
    split_dirs: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("train",),
        "val": ("val",),
        "test": ("test", "val"),
    }

    def __init__(self, root: str | None = None, image_size: int = 224, resize: int | None = None):
        super().__init__(root)
        assert self.root is not None
        if image_size < 1:
            raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = image_size
        self.resize = resize if resize is not None else round(image_size / 0.875)
        if self.resize < image_size:
            raise DataError(f"resize ({self.resize}) must be at least image_size ({image_size})")
        train = self._split_dir("train")
        classes = sorted(e.name for e in train.iterdir() if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{train} has no class subdirectories; expected {train}/<class name>/<image>")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.num_classes = len(classes)  # per instance: it depends on the folder
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(self.resize, antialias=True),
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self._folders: dict[str, ImageFolder] = {}
        # a val/ next to test/ is a validation split of its own (used for eval.val_fraction);
        # without test/, val/ is the test split
        if all((self.root / d).is_dir() for d in ("val", "test")):
            self.splits = ("train", "val", "test")  # type: ignore[misc]

    def _split_dir(self, name: str) -> Path:
        assert self.root is not None
        for sub in self.split_dirs[name]:
            if (self.root / sub).is_dir():
                return self.root / sub
        wanted = " or ".join(f"{self.root / s}/" for s in self.split_dirs[name])
        raise DataError(
            f"dataset imagefolder: split {name!r} needs {wanted} "
            f"(layout: <root>/<split>/<class name>/<image>)"
        )

    def split(self, name: str) -> Dataset:
        """The images of one split, decoded when indexed: ``(float [3, S, S], int label)``."""
        check_split(self, name, tuple(self.split_dirs))
        if name not in self._folders:
            directory = self._split_dir(name)
            extra = sorted(
                e.name
                for e in directory.iterdir()
                if e.is_dir() and not e.name.startswith(".") and e.name not in self.class_to_idx
            )
            if extra:
                raise DataError(
                    f"{directory} has class directories that train/ lacks: {', '.join(extra[:5])}"
                    f"{' ...' if len(extra) > 5 else ''}"
                )
            folder = _ClassFolder(directory, self.class_to_idx, self.transform)
            if not folder.samples:
                raise DataError(f"{directory} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
            self._folders[name] = folder
        return self._folders[name]

    def _spurious_dir(self) -> Path | None:
        assert self.root is not None
        d = self.root / SPURIOUS_DIR
        return d if d.is_dir() else None

    def _spurious_classes(self, directory: Path) -> dict[str, int]:
        """Sub-folder name -> class index: a class of ``train/`` or the release's naming."""
        out, unknown = {}, []
        for e in sorted(directory.iterdir()):
            if not e.is_dir() or e.name.startswith("."):
                continue
            parts = e.name.split("_")
            if e.name in self.class_to_idx:
                out[e.name] = self.class_to_idx[e.name]
            elif len(parts) >= 4 and parts[2].isdigit() and parts[-1].isdigit():
                if int(parts[2]) >= self.num_classes:
                    raise DataError(
                        f"{e}: class index {parts[2]} is out of range (train/ has {self.num_classes} classes)"
                    )
                out[e.name] = int(parts[2])
            else:
                unknown.append(e.name)
        if unknown:
            raise DataError(
                f"{directory} has folders that name no class of train/: {', '.join(unknown[:5])}"
                f"{' ...' if len(unknown) > 5 else ''}; expected {directory}/<class name>/<image>"
            )
        if not out:
            raise DataError(
                f"{directory} has no class subdirectories; expected {directory}/<class name>/<image>"
            )
        return out

    def _spurious(self) -> ImageFolder:
        if SPURIOUS_SET not in self._folders:
            directory = self._spurious_dir()
            assert directory is not None
            folder = _ClassFolder(directory, self._spurious_classes(directory), self.transform)
            if not folder.samples:
                raise DataError(f"{directory} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
            self._folders[SPURIOUS_SET] = folder
        return self._folders[SPURIOUS_SET]

    def eval_splits(self) -> dict[str, Dataset]:
        """``spurious``: the images of ``<root>/spurious_images/`` when that folder exists."""
        return {SPURIOUS_SET: self._spurious()} if self._spurious_dir() is not None else {}

    def meta(self, split: str) -> dict[str, torch.Tensor]:
        if split == SPURIOUS_SET and self._spurious_dir() is not None:
            return {"spurious_only": torch.ones(len(self._spurious()), dtype=torch.bool)}
        return {}

    def fingerprint(self) -> dict:
        """Root, params, classes, sizes and a digest of each split's files: path, class, size, mtime
        (and of the spurious-only images, when there are any)."""
        digests, sizes = {}, {}
        for name in self.splits:
            folder = self.split(name)
            assert isinstance(folder, ImageFolder)
            digests[name] = _files_digest(folder)
            sizes[name] = len(folder)
        out = {
            **super().fingerprint(),
            "params": {"image_size": self.image_size, "resize": self.resize},
            "classes": len(self.classes),
            "sizes": sizes,
            "files": digests,
        }
        if self._spurious_dir() is not None:
            folder = self._spurious()
            out[SPURIOUS_SET] = {"size": len(folder), "files": _files_digest(folder)}
        return out


def _files_digest(folder: ImageFolder) -> str:
    """sha1 of every sample's relative path, class, size and mtime (first 16 hex digits)."""
    h = hashlib.sha1()
    for path, label in folder.samples:
        st = os.stat(path)
        rel = Path(path).relative_to(folder.root)
        h.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
