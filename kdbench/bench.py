"""Micro-benchmarks of the fused ops (``kdbench bench``): native vs eager vs compiled PyTorch.

Every case times one forward + backward step per implementation (CKA also forward alone):
the median of repeated runs after warm-up, the implementations interleaved round by round.
It reports, next to the time, the speed-up over eager PyTorch and over ``torch.compile``
of the same eager code (for CKA: over the six-line PyTorch version, :func:`sixline_cka`),
and the memory-bandwidth floor of the case: the bytes any implementation must move (read
the inputs, write the gradients) divided by the bandwidth of a large tensor copy measured
on this machine. ``x floor`` is how far an implementation is from that limit. The
pytest-benchmark suites in benchmarks/ time the same implementations (built by the
``*_case`` functions below).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import kdbench.kernels as K

Step = Callable[[], None]


@dataclass
class Case:
    """One benchmark case: named forward+backward steps over the same inputs."""

    name: str
    steps: dict[str, Step]
    bytes_moved: int  # minimum traffic of one forward + backward step
    baseline: str = "eager"
    compiled: str | None = "compiled"
    torch_ref: str | None = None  # plain-PyTorch version to beat (CKA: the six-line one)
    notes: dict[str, str] = field(default_factory=dict)


# --- the eager formulations the anchors write --------------------------------------------


def eager_kd(s: Tensor, t: Tensor, T: float = 4.0) -> Tensor:
    """Hinton KD as the reference implementations write it."""
    return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T * T


def eager_dkd(s: Tensor, t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0):
    """mdistiller's dkd_loss (megvii-research/mdistiller), eager."""
    gt_mask = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(s).scatter_(1, target.unsqueeze(1), 0).bool()
    p_s = F.softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    b_s = torch.cat([(p_s * gt_mask).sum(1, keepdim=True), (p_s * other_mask).sum(1, keepdim=True)], 1)
    b_t = torch.cat([(p_t * gt_mask).sum(1, keepdim=True), (p_t * other_mask).sum(1, keepdim=True)], 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T**2 / target.shape[0]
    q_t = F.softmax(t / T - 1000.0 * gt_mask, dim=1)
    log_q_s = F.log_softmax(s / T - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * T**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def _hsic_pair_cka(x: Tensor, y: Tensor) -> Tensor:
    """CKA of one pair the way per-pair CKA libraries compute it: both Grams every time."""
    x, y = x.flatten(1), y.flatten(1)
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype) - 1.0 / n
    k, lm = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    hsic = (k * lm).sum()
    return hsic / (k.norm() * lm.norm())


def loop_cka(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Per-pair loop: L_x * L_y pairs, each recomputing both Grams."""
    return torch.stack([torch.stack([_hsic_pair_cka(x, y) for y in ys]) for x in xs])


def batched_cka(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Gram-once batched PyTorch: one bmm per side, centring, one GEMM for all pairs."""

    def grams(a: list[Tensor]) -> Tensor:
        x = torch.stack([v.flatten(1) for v in a])
        g = x @ x.transpose(1, 2)
        g = g - g.mean(1, keepdim=True)
        g = g - g.mean(2, keepdim=True)
        return g.flatten(1)

    gx, gy = grams(xs), grams(ys)
    return (gx @ gy.T) / (gx.norm(dim=1)[:, None] * gy.norm(dim=1)[None, :])


def sixline_cka(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Plain PyTorch linear CKA: centre the features, one Gram per layer, one GEMM."""

    def grams(a: list[Tensor]) -> Tensor:
        return torch.stack([(c := v.flatten(1) - v.flatten(1).mean(0)) @ c.T for v in a]).flatten(1)

    gx, gy = grams(xs), grams(ys)
    return (gx @ gy.T) / (gx.norm(dim=1)[:, None] * gy.norm(dim=1)[None, :])


# --- cases -------------------------------------------------------------------------------


def _compile(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _weighted(fn: Callable[..., Tensor], weight: float) -> Callable[..., Tensor]:
    def weighted(*args) -> Tensor:
        return weight * fn(*args)

    return weighted


def _loss_step(fn: Callable[..., Tensor], s: Tensor, *args) -> Step:
    def step() -> None:
        s.grad = None
        fn(s, *args).backward()

    return step


def kd_case(B: int, C: int, with_compiled: bool = True) -> Case:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(B, C, generator=g) * 3).requires_grad_(True)
    t = torch.randn(B, C, generator=g) * 3
    steps = {
        "native": _loss_step(K.kd_loss, s, t, 4.0),
        # a weighted loss (as in training: ce + 0.9 * kd) makes backward scale the stored
        # gradient, one extra B x C pass that loss.backward() on the bare loss skips
        "native (0.9 * loss)": _loss_step(_weighted(K.kd_loss, 0.9), s, t, 4.0),
        "eager": _loss_step(eager_kd, s, t, 4.0),
    }
    if with_compiled:
        steps["compiled"] = _loss_step(_compile(eager_kd), s, t, 4.0)
    return Case(
        f"KD fwd+bwd B={B} C={C}",
        steps,
        3 * B * C * s.element_size(),
        compiled="compiled" if with_compiled else None,
    )


def dkd_case(B: int, C: int, with_compiled: bool = True) -> Case:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(B, C, generator=g) * 3).requires_grad_(True)
    t = torch.randn(B, C, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g)
    steps = {
        "native": _loss_step(K.dkd_loss, s, t, y, 1.0, 8.0, 4.0),
        "native (0.9 * loss)": _loss_step(_weighted(K.dkd_loss, 0.9), s, t, y, 1.0, 8.0, 4.0),
        "eager (mdistiller)": _loss_step(eager_dkd, s, t, y, 1.0, 8.0, 4.0),
    }
    if with_compiled:
        steps["compiled (mdistiller)"] = _loss_step(_compile(eager_dkd), s, t, y, 1.0, 8.0, 4.0)
    return Case(
        f"DKD fwd+bwd B={B} C={C}",
        steps,
        3 * B * C * s.element_size(),
        baseline="eager (mdistiller)",
        compiled="compiled (mdistiller)" if with_compiled else None,
    )


def cka_case(n: int, L: int, d: int, forward_only: bool = False) -> Case:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, d, generator=g).requires_grad_(True) for _ in range(L)]
    ys = [torch.randn(n, d, generator=g) for _ in range(L)]

    def step_of(fn: Callable[[list[Tensor], list[Tensor]], Tensor]) -> Step:
        def step() -> None:
            if forward_only:
                with torch.no_grad():
                    fn(xs, ys)
                return
            for x in xs:
                x.grad = None
            fn(xs, ys).sum().backward()

        return step

    steps = {"native": step_of(K.cka_matrix), "six-line PyTorch": step_of(sixline_cka)}
    if not forward_only:
        steps["per-pair loop"] = step_of(loop_cka)
    steps["Gram-once PyTorch"] = step_of(batched_cka)
    # read xs and ys (forward); read xs again for the backward GEMMs, write d xs
    bytes_moved = (2 * L if forward_only else 4 * L) * n * d * xs[0].element_size()
    return Case(
        f"CKA {'fwd' if forward_only else 'fwd+bwd'} n={n} L={L}+{L} d={d}",
        steps,
        bytes_moved,
        baseline="six-line PyTorch" if forward_only else "per-pair loop",
        compiled="Gram-once PyTorch",
        torch_ref="six-line PyTorch",
    )


# --- where it ran -------------------------------------------------------------------------


def bench_environment() -> dict:
    """Where the numbers come from: the environment recorded with every result
    (kdbench.engine.cell.environment: CPU model and capability, BLAS, torch, threads, git
    sha, ...) plus the CKA Gram kernel chosen for this process."""
    from kdbench.engine.cell import environment

    return {**environment(), "cka_gram": K.gram_backend()}


def format_environment(env: dict) -> str:
    """One line naming the machine and software the numbers were measured with."""
    sha = (env.get("git_sha") or "unknown")[:12]
    gram = env.get("cka_gram") or {}
    return (
        f"cpu={env.get('cpu')} capability={env.get('cpu_capability')} blas={env.get('blas')} "
        f"torch={env.get('torch')} threads={env.get('threads')} git={sha} "
        f"kernels={env.get('kernels')} cka_gram={gram.get('gram')} ({gram.get('reason')})"
    )


# --- timing --------------------------------------------------------------------------------


def time_step(step: Step, repeats: int, warmup: int = 2, max_seconds: float = 20.0) -> float:
    """Median wall time of ``step`` in seconds."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_steps(
    steps: dict[str, Step], repeats: int, warmup: int = 2, max_seconds: float = 20.0
) -> dict[str, float]:
    """Median wall time of each step in seconds, timed round-robin (one call of each per
    round), so that load from other processes falls on every implementation alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    budget = max_seconds * len(steps)
    rounds = 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() - start < budget):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


def measure_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Copy bandwidth in bytes/s (bytes read + bytes written) of a large tensor copy."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    seconds = time_step(lambda: dst.copy_(src), repeats)
    return 2 * n_bytes / seconds


def run_bench(
    quick: bool = False,
    json_path: str | Path | None = None,
    threads: list[int] | None = None,
    only: str | None = None,
    on_case: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Runs every case (at each thread count in ``threads``; default: the current one) and
    returns one row per (case, threads, implementation), each with the ``environment`` it
    ran in (:func:`bench_environment`); also writes them as JSON. ``only``
    keeps the cases of one op ("kd", "dkd", "cka"); ``on_case`` gets each case's rows as
    soon as it is timed."""
    repeats = 5 if quick else 20
    if quick:
        cases = [
            ("kd", lambda: kd_case(1024, 1000)),
            ("dkd", lambda: dkd_case(1024, 1000)),
            ("cka", lambda: cka_case(128, 4, 1024, forward_only=True)),
            ("cka", lambda: cka_case(128, 4, 1024)),
        ]
    else:
        cases = [
            ("kd", lambda: kd_case(1024, 1000)),
            ("kd", lambda: kd_case(1024, 32000)),
            ("dkd", lambda: dkd_case(1024, 1000)),
            ("dkd", lambda: dkd_case(1024, 32000)),
            ("cka", lambda: cka_case(256, 16, 4096, forward_only=True)),
            ("cka", lambda: cka_case(256, 16, 4096)),
        ]
    cases = [make for op, make in cases if only is None or op == only.lower()]
    previous_threads = torch.get_num_threads()
    env = bench_environment()
    bandwidth = measure_bandwidth(64 * 2**20 if quick else 256 * 2**20)
    rows: list[dict] = []
    try:
        for n_threads in threads or [previous_threads]:
            torch.set_num_threads(n_threads)
            for make in cases:
                case = make()
                times = time_steps(case.steps, repeats)
                case_rows = [
                    {**r, "environment": {**env, "threads": n_threads}} for r in _rows(case, times, bandwidth)
                ]
                rows.extend(case_rows)
                if on_case is not None:
                    on_case(case_rows)
                del case
    finally:
        torch.set_num_threads(previous_threads)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _rows(case: Case, times: dict[str, float], bandwidth: float) -> list[dict]:
    floor = case.bytes_moved / bandwidth
    return [
        {
            "case": case.name,
            "impl": name,
            "ms": seconds * 1e3,
            "speedup_vs_baseline": times[case.baseline] / seconds,
            "baseline": case.baseline,
            "speedup_vs_compiled": (times[case.compiled] / seconds) if case.compiled else None,
            "compiled": case.compiled,
            "speedup_vs_torch": (times[case.torch_ref] / seconds) if case.torch_ref else None,
            "torch_ref": case.torch_ref,
            "floor_ms": floor * 1e3,
            "x_floor": seconds / floor,
            "backend": K.backend(),
            "threads": torch.get_num_threads(),
            "bandwidth_GBps": bandwidth / 1e9,
        }
        for name, seconds in times.items()
    ]


def format_table(rows: list[dict]) -> str:
    """The rows as a plain-text table."""
    from tabulate import tabulate

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    table = [
        [
            r["case"],
            r["threads"],
            r["impl"],
            fmt(r["ms"], ".2f"),
            f"{r['speedup_vs_baseline']:.2f}x vs {r['baseline']}",
            fmt(r["speedup_vs_compiled"], ".2f") + ("x" if r["speedup_vs_compiled"] else ""),
            fmt(r.get("speedup_vs_torch"), ".2f") + ("x" if r.get("speedup_vs_torch") else ""),
            fmt(r["floor_ms"], ".2f"),
            fmt(r["x_floor"], ".1f"),
        ]
        for r in rows
    ]
    headers = [
        "case",
        "threads",
        "implementation",
        "ms",
        "speed-up (baseline)",
        "vs compiled",
        "vs six-line torch",
        "floor ms",
        "x floor",
    ]
    return tabulate(table, headers=headers, tablefmt="github")


def bench_command(
    quick: bool = False,
    json: Path | None = None,  # noqa: A002 - CLI flag name
    threads: str | None = None,
    only: str | None = None,
) -> None:
    """Run the kernel micro-benchmarks and print the table (``kdbench bench``).

    ``threads`` is a comma-separated list of torch thread counts ("1,2"); ``only`` keeps
    the cases of one op ("kd", "dkd", "cka").
    """
    from rich.console import Console

    from kdbench.errors import KdbenchError

    try:
        counts = [int(t) for t in threads.split(",")] if threads else None
    except ValueError:
        counts = None
    if threads and (not counts or min(counts) < 1):
        raise KdbenchError(
            f"--threads takes positive integers separated by commas (e.g. 1,2), got {threads!r}"
        )
    if only and only.lower() not in ("kd", "dkd", "cka"):
        raise KdbenchError(f"--only takes kd, dkd or cka, got {only!r}")
    console = Console()
    console.print(
        f"kdbench bench: backend={K.backend()}, torch threads={threads or torch.get_num_threads()}"
        + (" (quick)" if quick else ""),
        highlight=False,
    )
    env = {**bench_environment(), "threads": threads or torch.get_num_threads()}
    console.print(format_environment(env), highlight=False, markup=False, soft_wrap=True)

    def show(case_rows: list[dict]) -> None:  # one table per case, printed as it finishes
        print(format_table(case_rows), flush=True)

    rows = run_bench(quick=quick, json_path=json, threads=counts, only=only, on_case=show)
    if rows:
        console.print(f"measured copy bandwidth: {rows[0]['bandwidth_GBps']:.1f} GB/s")
