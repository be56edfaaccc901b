"""Deterministic batching with sample indices.

In-memory ``TensorDataset`` splits are batched by indexing (no worker processes: fastest on
small data). Anything else goes through a ``DataLoader`` whose order comes from the same
seeded generator. Every batch carries the samples' positions in the split (CRD needs them).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


class _Indexed(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, y, i


class Batches:
    """Iterates a split in batches of (x, y, index); shuffled by ``generator`` when given."""

    def __init__(self, data: Dataset, batch_size: int, workers: int = 0):
        self.data = data
        self.batch_size = batch_size
        self.workers = workers
        # TensorDataset (and subclasses that normalise on the fly) index a whole batch at once
        self.indexable = isinstance(data, TensorDataset)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def targets(self) -> Tensor:
        for attr in ("labels", "targets"):
            t = getattr(self.data, attr, None)
            if isinstance(t, torch.Tensor):
                return t.long()
        if self.indexable:
            return torch.as_tensor(self.data.tensors[1]).long()  # type: ignore[attr-defined]
        t = getattr(self.data, "targets", None)
        if t is not None:
            return torch.as_tensor(t).long()
        return torch.tensor([int(self.data[i][1]) for i in range(len(self))])

    def iterate(
        self, generator: torch.Generator | None = None, drop_singletons: bool = True
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        if self.indexable:
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                if drop_singletons and len(idx) < 2 and n > 1:
                    continue  # BatchNorm cannot train on one sample
                x, y = self.data[idx]
                yield x.float(), torch.as_tensor(y).long(), idx
            return
        loader = DataLoader(
            _Indexed(self.data),
            batch_size=self.batch_size,
            sampler=order.tolist(),
            num_workers=self.workers,
            persistent_workers=False,
        )
        for x, y, idx in loader:
            if drop_singletons and len(idx) < 2 and n > 1:
                continue
            yield x.float(), y.long(), idx
