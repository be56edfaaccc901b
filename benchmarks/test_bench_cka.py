"""CKA matrix, forward and forward + backward: native vs the six-line PyTorch version,
Gram-once PyTorch and (forward + backward only) the per-pair loop."""

from __future__ import annotations

import functools

import pytest

from kdbench import bench


@functools.cache
def _case(n: int, L: int, d: int, forward_only: bool) -> bench.Case:
    return bench.cka_case(n, L, d, forward_only=forward_only)


@pytest.mark.parametrize("n,L,d", [(256, 16, 4096)])
@pytest.mark.parametrize("forward_only", [True, False], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["native", "six-line PyTorch", "per-pair loop", "Gram-once PyTorch"])
def test_cka(benchmark, n, L, d, forward_only, impl):
    case = _case(n, L, d, forward_only)
    if impl not in case.steps:
        pytest.skip(f"{impl} is timed forward + backward only")
    step = case.steps[impl]
    step()
    benchmark.group = f"cka {'fwd' if forward_only else 'fwd+bwd'} n={n} L={L}+{L} d={d}"
    benchmark.pedantic(step, rounds=3 if impl == "per-pair loop" else 5, iterations=1)
