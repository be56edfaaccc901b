"""Corrupted test sets: generated (CIFAR-10-C recipe) or read from a CIFAR-10-C/100-C folder.

Switched on by the grid's ``eval:`` block::

    eval:
      corruptions: all            # the 15; "extra" (the release's 4 more), or a list of names/groups
      severities: [1, 2, 3, 4, 5] # default: all five
      corruption_seed: 0          # seed of the random corruptions (default 0)
      corruptions_root: ~/data/CIFAR-10-C   # optional: real files instead of generated ones

A dataset plugin may point at a real folder itself (an attribute ``corruptions_root``, e.g.
from a dataset parameter); ``eval.corruptions_root`` wins. Each set is exposed to evaluation
as ``"c/<corruption>/<severity>"``. Generated sets are
built once per (dataset fingerprint, corruption, severity, seed, test-set size) and cached in
the run directory (``corruptions/<key>.pt``, checksummed; a damaged file is rebuilt, the
sets being deterministic). Every cell of a run therefore sees the very same corrupted images,
whatever its own seed.

A real CIFAR-10-C / CIFAR-100-C folder holds ``<corruption>.npy`` (uint8 ``[5·M, 32, 32, 3]``,
severities 1..5 in consecutive blocks of M = 10000) and ``labels.npy`` (``[5·M]``); its images
are normalised with the dataset's own mean/std. Files are memory-mapped: a set reads only its
block. The release has 19 files: the 15 corruptions plus the "extra" ``speckle_noise``,
``gaussian_blur``, ``spatter`` and ``saturate`` (generated too); as in the paper, the extra
sets are evaluated when asked for but left out of ``corruption_acc`` (the 15-corruption mean).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdbench.artifacts import ArtifactCorrupt, file_lock, load_checked, save_checked
from kdbench.datasets._util import NormalizedImages
from kdbench.errors import ConfigError, DataError
from kdbench.robustness import corruptions as C

log = logging.getLogger(__name__)

PREFIX = "c/"


def set_name(corruption: str, severity: int) -> str:
    return f"{PREFIX}{corruption}/{severity}"


def parse_set_name(name: str) -> tuple[str, int] | None:
    """``"c/fog/3"`` -> ``("fog", 3)``; None for other set names."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] + "/" != PREFIX or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


#: group names usable in ``eval.corruptions`` (alone or inside a list)
GROUPS: dict[str, tuple[str, ...]] = {"all": C.CORRUPTIONS, "extra": C.EXTRA}


def selected(eval_cfg: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """The (corruptions, severities) an eval config asks for; ([], []) when none.

    ``corruptions`` may be ``"all"`` (the 15), ``"extra"`` (the release's four more), a list
    of names and groups, or None (off; but a ``corruptions_root`` alone means the 15).
    """
    names = eval_cfg.get("corruptions")
    if names is None and eval_cfg.get("corruptions_root"):
        names = "all"
    if names is None:
        return [], []
    if isinstance(names, str):
        names = [names]
    names = [n for item in names for n in GROUPS.get(item, (item,))]
    sev = eval_cfg.get("severities") or list(C.SEVERITIES)
    bad = [n for n in names if n not in C.ALL]
    if bad:
        raise ConfigError(
            f"eval.corruptions: unknown {', '.join(map(repr, bad))}; "
            f"choose 'all', 'extra' or from: {', '.join(C.ALL)}"
        )
    bad_s = [s for s in sev if s not in C.SEVERITIES]
    if bad_s:
        raise ConfigError(f"eval.severities: {bad_s} out of range; severities are 1..5")
    return list(dict.fromkeys(names)), sorted(set(sev))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CorruptionSets(Mapping):
    """``{"c/<corruption>/<severity>": NormalizedImages}``, each built on first access.

    Values are not kept: iterate set by set (CIFAR-10's 75 sets would not fit in memory).
    """

    def __init__(
        self,
        test: NormalizedImages,
        names: list[str],
        severities: list[int],
        fingerprint: Any,
        cache_dir: Path | None,
        seed: int = 0,
        root: str | Path | None = None,
    ):
        self.test = test
        self.names = names
        self.severities = severities
        self.fingerprint = fingerprint
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = int(seed)
        self.root = Path(root).expanduser() if root else None
        self._keys = [set_name(n, s) for n in names for s in severities]
        if self.root is not None:
            self._check_root()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> NormalizedImages:
        if key not in self._keys:
            raise KeyError(key)
        parsed = parse_set_name(key)
        assert parsed is not None
        name, severity = parsed
        images, labels = self._from_root(name, severity) if self.root else self._generated(name, severity)
        return NormalizedImages(images, labels, self.test.mean, self.test.std)

    def labels(self, key: str) -> torch.Tensor:
        """The labels of set ``key`` without loading its images."""
        parsed = parse_set_name(key)
        if key not in self._keys or parsed is None:
            raise KeyError(key)
        if self.root is None:
            return self.test.labels
        labels = self._load(self.root / "labels.npy")
        m = len(labels) // 5
        return torch.from_numpy(np.asarray(labels[(parsed[1] - 1) * m : parsed[1] * m]).astype(np.int64))

    def source_key(self, name: str, severity: int) -> str:
        """Identifies the samples of a set across cells (the generation key, or the file read)."""
        if self.root is None:
            return self.cache_key(name, severity)
        f = self.root / f"{name}.npy"
        st = f.stat()
        return _digest(
            {"root": str(self.root.resolve()), "file": f.name, "size": st.st_size, "mtime": st.st_mtime}
        )

    # ------------------------------------------------------------------ generated

    def cache_key(self, name: str, severity: int) -> str:
        return _digest(
            {
                "dataset": self.fingerprint,
                "n": len(self.test),
                "corruption": name,
                "severity": severity,
                "seed": self.seed,
                "version": C.VERSION,
            }
        )

    def _generated(self, name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_dir is None:
            return self._generate(name, severity), self.test.labels
        path = self.cache_dir / f"{name}-{severity}-{self.cache_key(name, severity)}.pt"
        with file_lock(self.cache_dir / f".{path.stem}.lock"):
            if path.exists():
                try:
                    obj = load_checked(path)
                    return obj["images"], obj["labels"]
                except ArtifactCorrupt as e:
                    log.warning("%s; regenerating it", e)
            images = self._generate(name, severity)
            save_checked({"images": images, "labels": self.test.labels.clone()}, path)
        return images, self.test.labels

    def _generate(self, name: str, severity: int) -> torch.Tensor:
        clean = self.test.images.permute(0, 2, 3, 1).numpy()  # uint8 [N, H, W, C]
        out = C.corrupt(clean, name, severity, self.seed)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ real files

    def _check_root(self) -> None:
        assert self.root is not None
        if not self.root.is_dir():
            raise DataError(f"eval.corruptions_root {str(self.root)!r} is not a directory")
        missing = [f"{n}.npy" for n in self.names if not (self.root / f"{n}.npy").exists()]
        if not (self.root / "labels.npy").exists():
            missing.append("labels.npy")
        if missing:
            raise DataError(
                f"eval.corruptions_root {str(self.root)!r} lacks {', '.join(missing)}; "
                "point it at an extracted CIFAR-10-C / CIFAR-100-C folder or list only the "
                "corruptions it has in eval.corruptions"
            )

    def _from_root(self, name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.root is not None
        labels = self._load(self.root / "labels.npy")
        images = self._load(self.root / f"{name}.npy")
        n, c, h, w = self.test.images.shape
        if images.ndim != 4 or images.shape[1:] != (h, w, c) or images.dtype != np.uint8:
            raise DataError(
                f"{self.root / f'{name}.npy'}: expected uint8 images [5·M, {h}, {w}, {c}] for this "
                f"dataset, found {images.dtype} {images.shape}"
            )
        if len(images) % 5 or len(labels) != len(images):
            raise DataError(
                f"{self.root / f'{name}.npy'}: {len(images)} images and {len(labels)} labels; "
                "expected 5 severity blocks of equal size and one label per image"
            )
        m = len(images) // 5
        block = slice((severity - 1) * m, severity * m)
        x = torch.from_numpy(np.array(images[block])).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(np.asarray(labels[block]).astype(np.int64))
        return x, y

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read ({e}); the file is damaged, extract it again") from None


def corruption_sets(
    dataset: Any, test_split: NormalizedImages, eval_cfg: Mapping[str, Any], run_dir: Path | None
) -> CorruptionSets:
    """The corrupted test sets a cell's ``eval`` config asks for (empty when it asks for none).

    ``dataset`` is the dataset plugin (its ``fingerprint()`` is used) or a fingerprint dict
    (the cell's ``dataset`` entry); ``test_split`` must be the in-memory ``NormalizedImages``
    test split. ``run_dir`` None disables the cache.
    """
    names, severities = selected(eval_cfg)
    if names and not isinstance(test_split, NormalizedImages):
        raise DataError(
            f"corruption evaluation needs an in-memory test split (NormalizedImages), got "
            f"{type(test_split).__name__}; drop eval.corruptions for this dataset"
        )
    fp = dataset if isinstance(dataset, dict) else (dataset.fingerprint() if names else None)
    seed = eval_cfg.get("corruption_seed")
    return CorruptionSets(
        test_split,
        names,
        severities,
        fp,
        Path(run_dir) / "corruptions" if run_dir is not None else None,
        seed=0 if seed is None else seed,
        root=eval_cfg.get("corruptions_root"),
    )


def _of_the_15(set_key: str) -> bool:
    parsed = parse_set_name(set_key)
    return parsed is not None and parsed[0] in C.CORRUPTIONS


def corruption_aggregates(metrics: Mapping[str, float], clean_key: str = "top1") -> dict[str, float]:
    """``corruption_acc`` (RobustBench: mean top-1 over the sets of the 15 corruptions; the
    extra ones are not in it, as in the paper) and ``corruption_rel_drop``
    (``100 · (clean − corruption_acc) / clean``) from flat metrics.

    Empty when ``metrics`` holds no ``c/<corruption>/<severity>/top1`` of the 15.
    """
    accs = [v for k, v in metrics.items() if k.endswith("/top1") and _of_the_15(k[: -len("/top1")])]
    if not accs:
        return {}
    acc = float(np.mean(accs))
    out = {"corruption_acc": acc}
    clean = metrics.get(clean_key)
    if clean:
        out["corruption_rel_drop"] = 100.0 * (clean - acc) / clean
    return out


# --------------------------------------------------------------------------- engine hooks


class _LazySet(TensorDataset):
    """One corrupted set as the engine batches it, loaded (or generated) on first use.

    At most one loaded set is kept per process, so evaluating 75 sets one after the other
    holds one in memory. Labels are known without loading the images.
    """

    _slot: tuple[int, NormalizedImages] | None = None

    def __init__(self, sets: CorruptionSets, name: str):  # no super().__init__: lazy tensors
        self.sets = sets
        self.name = name
        self.labels = sets.labels(name)

    def _data(self) -> NormalizedImages:
        slot = _LazySet._slot
        if slot is None or slot[0] != id(self):
            _LazySet._slot = None  # free the previous set first
            _LazySet._slot = (id(self), self.sets[self.name])
        return _LazySet._slot[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):  # type: ignore[override]
        return self._data()[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self._data().tensors


def _plain(obj: Any) -> dict:
    if obj is None:
        return {}
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else dict(obj)


def eval_set_provider(dataset: Any, cell: Any, cache_dir: Path) -> dict:
    """``evaluation.register_eval_sets`` hook: the cell's corrupted sets as lazy EvalSets."""
    from kdbench.engine.data import Batches
    from kdbench.engine.evaluation import EvalSet

    if cell is None:  # a teacher's own evaluation: it has no eval config
        return {}
    evc = _plain(cell.eval)
    if not evc.get("corruptions_root") and getattr(dataset, "corruptions_root", None):
        evc["corruptions_root"] = str(dataset.corruptions_root)  # a dataset parameter pointing at one
    names, _ = selected(evc)
    if not names:
        return {}
    # the dataset entry of the cell (name, params, file fingerprint) identifies the clean data
    sets = corruption_sets(_plain(cell.dataset), dataset.split("test"), evc, None)
    sets.cache_dir = Path(cache_dir) / "corruptions"
    out = {}
    for key in sets:
        name, severity = parse_set_name(key)  # type: ignore[misc]
        batches = Batches(_LazySet(sets, key), int(evc.get("batch_size") or 512))
        out[key] = EvalSet(key, batches, key=f"c-{name}-{severity}-{sets.source_key(name, severity)}")
    return out


def aggregate(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``evaluation.register_aggregate`` hook: corruption_acc and corruption_rel_drop."""
    flat = {f"{k}/{m}": v for k, ms in per_set.items() if parse_set_name(k) for m, v in ms.items()}
    if "test" in per_set and "top1" in per_set["test"]:
        flat["top1"] = per_set["test"]["top1"]
    return corruption_aggregates(flat)


def teacher_family(
    logits: torch.Tensor, y: torch.Tensor, meta: Any, teacher_logits: torch.Tensor | None, ctx: Any
) -> dict[str, float]:
    """The teacher's top-1 on each corrupted set (``c/<corruption>/<severity>/teacher_top1``).

    Teachers are evaluated on their own sets only; this records their corruption accuracy in
    the cells that use them (the logits are computed for agreement anyway, and cached).
    """
    if teacher_logits is None or ctx.cheap or parse_set_name(ctx.set_name) is None or len(y) == 0:
        return {}
    return {"teacher_top1": 100.0 * float((teacher_logits.argmax(1) == y).float().mean())}


def _register() -> None:
    try:
        from kdbench.engine import evaluation
    except ImportError:  # pragma: no cover - the engine is part of the package
        return
    evaluation.register_eval_sets(eval_set_provider)
    evaluation.register_aggregate(aggregate)
    evaluation.register_family(teacher_family)


_register()
