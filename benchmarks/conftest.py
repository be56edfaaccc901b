"""pytest-benchmark suites of the fused ops: ``pytest benchmarks/ --benchmark-only``.

The implementations and inputs come from kdbench.bench (the same ones ``kdbench bench``
times). Cases are built once per module; torch.compile variants are warmed up by the
case builder's first calls before timing starts.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.benchmark_suite)


def pytest_configure(config):
    config.addinivalue_line("markers", "benchmark_suite: a kernel micro-benchmark")
