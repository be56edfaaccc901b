"""Forward + backward of the KD and DKD losses: native vs eager vs torch.compile."""

from __future__ import annotations

import functools

import pytest

from kdbench import bench

SHAPES = [(1024, 1000), (1024, 32000)]


@functools.cache
def _case(kind: str, B: int, C: int) -> bench.Case:
    return bench.kd_case(B, C) if kind == "kd" else bench.dkd_case(B, C)


def _run(benchmark, kind, B, C, impl):
    step = _case(kind, B, C).steps[impl]
    for _ in range(3):  # warm-up (and, for torch.compile, compilation)
        step()
    benchmark.group = f"{kind} fwd+bwd B={B} C={C}"
    benchmark.pedantic(step, rounds=10 if C <= 1000 else 3, iterations=1)


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("impl", ["native", "native (0.9 * loss)", "eager", "compiled"])
def test_kd(benchmark, B, C, impl):
    _run(benchmark, "kd", B, C, impl)


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize(
    "impl", ["native", "native (0.9 * loss)", "eager (mdistiller)", "compiled (mdistiller)"]
)
def test_dkd(benchmark, B, C, impl):
    _run(benchmark, "dkd", B, C, impl)
