"""Native cka_matrix vs the six-line PyTorch version, interleaved in one process.

    OMP_NUM_THREADS=1 python benchmarks/cka_ratio.py --threads 1 --rounds 7
    OMP_NUM_THREADS=2 python benchmarks/cka_ratio.py --threads 2 --rounds 7

Each round times forward (no grad) and forward + backward (grad w.r.t. xs) of both
implementations back to back, so load from other processes hits both sides alike. Prints
median and best wall times and the ratio six-line / native (> 1: native is faster); at one
thread also the ratio of thread CPU times, which is robust to a shared machine. The first
lines say where it ran (CPU, capability, BLAS, torch, git sha) and which kernel computed
the Grams; ``--gram avx2|avx512|blas`` forces one (KDBENCH_GRAM, read once per process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kdbench.kernels as K
from kdbench.bench import bench_environment, format_environment, sixline_cka


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--gram", choices=["avx2", "avx512", "blas", "measure"], default=None)
    a = ap.parse_args()
    if a.gram:
        os.environ["KDBENCH_GRAM"] = a.gram
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(a.n, a.d, generator=g).requires_grad_(True) for _ in range(a.layers)]
    ys = [torch.randn(a.n, a.d, generator=g) for _ in range(a.layers)]
    torch.testing.assert_close(K.cka_matrix(xs, ys), sixline_cka(xs, ys), rtol=1e-4, atol=1e-5)

    def fwd(fn):
        def step():
            with torch.no_grad():
                fn(xs, ys)

        return step

    def fwd_bwd(fn):
        def step():
            for x in xs:
                x.grad = None
            fn(xs, ys).sum().backward()

        return step

    steps = {
        ("fwd", "native"): fwd(K.cka_matrix),
        ("fwd", "six-line"): fwd(sixline_cka),
        ("fwd+bwd", "native"): fwd_bwd(K.cka_matrix),
        ("fwd+bwd", "six-line"): fwd_bwd(sixline_cka),
    }
    wall: dict = {k: [] for k in steps}
    cpu: dict = {k: [] for k in steps}
    for step in steps.values():
        step()
    for _ in range(a.rounds):
        for k, step in steps.items():
            w, c = time.perf_counter(), time.thread_time()
            step()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.thread_time() - c)
    print(format_environment({**bench_environment(), "threads": a.threads}))
    print(
        f"backend={K.backend()} threads={a.threads} n={a.n} L={a.layers}+{a.layers} d={a.d} rounds={a.rounds}"
    )
    for mode in ("fwd", "fwd+bwd"):
        nat, six = (mode, "native"), (mode, "six-line")
        med = {k: statistics.median(wall[k]) for k in (nat, six)}
        best = {k: min(wall[k]) for k in (nat, six)}
        line = (
            f"{mode:8s} native {med[nat] * 1e3:8.1f} ms (best {best[nat] * 1e3:7.1f})"
            f"  six-line {med[six] * 1e3:8.1f} ms (best {best[six] * 1e3:7.1f})"
            f"  ratio median {med[six] / med[nat]:.2f} best {best[six] / best[nat]:.2f}"
        )
        if a.threads == 1:
            line += f"  cpu-time ratio {statistics.median(cpu[six]) / statistics.median(cpu[nat]):.2f}"
        print(line)


if __name__ == "__main__":
    main()
