"""Forward + backward of the CKA matrix: native vs per-pair loop vs Gram-once PyTorch."""

from __future__ import annotations

import functools

import pytest

from kdbench import bench


@functools.cache
def _case(n: int, L: int, d: int) -> bench.Case:
    return bench.cka_case(n, L, d)


@pytest.mark.parametrize("n,L,d", [(256, 16, 4096)])
@pytest.mark.parametrize("impl", ["native", "per-pair loop", "Gram-once PyTorch"])
def test_cka(benchmark, n, L, d, impl):
    step = _case(n, L, d).steps[impl]
    step()
    benchmark.group = f"cka fwd+bwd n={n} L={L}+{L} d={d}"
    benchmark.pedantic(step, rounds=3 if impl == "per-pair loop" else 5, iterations=1)
