"""GPU check: everything kdbench has only compiled and CPU-tested, run once on a GPU machine.

One command (``make gpu-check``) from a fresh clone after ``make install``. Each step runs in its
own subprocess with a time limit; a failed or timed-out step is recorded and the check goes on.
The steps:

1. kernel tests: ``pytest tests/test_kernels.py -k "cuda or opcheck"`` — the CUDA variants of the
   correctness, gradcheck, autocast, compile and ``torch.library.opcheck`` tests (on a GPU every
   one must run: a skip because a CUDA kernel is missing counts as a failure);
2. ``kdbench bench --quick``: the CPU micro-benchmarks, native vs eager / compiled / six-line;
3. device kernels: the same ops on ``--device`` (native vs eager, and vs ``torch.compile`` on
   CUDA), timed with device synchronisation;
4. ``benchmarks/grid_throughput.py`` at fp32, bf16 and bf16 + channels_last on ``--device``
   (in-memory data copied to the device once): images/s of the kd cell, the shared grid and a
   bare PyTorch KD loop;
5. a 2-rank DDP cell (``train: {gpus_per_cell: 2}``, nccl) through ``kdbench run`` when 2 GPUs are
   visible (``--ddp-cpu`` runs it over gloo on 2 CPU ranks instead).

Then one summary table (step, setting, pass/fail/skip, numbers, seconds) and, with ``--json``,
the same as JSON. Exit status 0 when no step failed. ``--device cpu --steps 2`` is the dry run
CI keeps (a couple of minutes on 2 cores).

    python benchmarks/gpu_check.py                        # GPU: about 4-6 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --steps 2 --json check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"]}
SETTINGS["bf16+channels_last"] = [*SETTINGS["bf16"], "--channels-last"]


@dataclass
class Row:
    """One line of the summary: a step (and its setting), pass/fail/skip, what it measured."""

    step: str
    setting: str
    status: str  # pass | fail | skip
    result: str
    seconds: float
    numbers: dict | None = None
    log: str | None = None


@dataclass
class Proc:
    """A finished (or timed-out) step subprocess."""

    rc: int | None  # None: timed out
    output: str
    seconds: float
    log: Path

    def tail(self, n: int = 15) -> str:
        lines = self.output.strip().splitlines()
        return "\n".join(lines[-n:])


def run_step(name: str, cmd: list[str], out: Path, timeout: float, env: dict | None = None) -> Proc:
    """Runs ``cmd`` from the repository root, its output saved to ``out/<name>.log``."""
    log = out / f"{re.sub(r'[^A-Za-z0-9_.+-]+', '_', name)}.log"
    t0 = time.perf_counter()
    # its own session, so that a timeout ends the step's children too (DDP ranks, compile workers)
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, rc = p.communicate(timeout=timeout)[0], p.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        output, rc = p.communicate()[0] + f"\n[timed out after {timeout:.0f} s]", None
    log.write_text(" ".join(cmd) + "\n\n" + output)
    return Proc(rc, output, time.perf_counter() - t0, log)


def failed(step: str, setting: str, proc: Proc) -> Row:
    why = "timed out" if proc.rc is None else f"exit {proc.rc}"
    return Row(step, setting, "fail", f"{why}; see {proc.log}", proc.seconds, log=str(proc.log))


# ------------------------------------------------------------------------------- steps


def kernel_tests(args: argparse.Namespace, out: Path) -> list[Row]:
    """CUDA kernel tests and opcheck; on a GPU a skipped CUDA test is a failure."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    proc = run_step("kernel-tests", [*cmd, "-k", "cuda or opcheck"], out, args.timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", proc.output)}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary"
    if proc.rc != 0:
        return [failed("kernel tests + opcheck", args.device, proc)]
    cuda_skips = [ln for ln in proc.output.splitlines() if ln.startswith("SKIPPED") and _is_cuda_skip(ln)]
    if args.device == "cuda" and (cuda_skips or not counts.get("passed")):
        why = cuda_skips[0].split(": ", 1)[-1] if cuda_skips else "nothing ran"
        return [Row("kernel tests + opcheck", "cuda", "fail", f"{summary}; {why}", proc.seconds, counts)]
    return [Row("kernel tests + opcheck", args.device, "pass", summary, proc.seconds, counts, str(proc.log))]


def _is_cuda_skip(line: str) -> bool:
    return any(s in line for s in ("no CUDA device", "without cuda kernels", "is not built"))


def cpu_bench(args: argparse.Namespace, out: Path) -> list[Row]:
    """``kdbench bench --quick``: the native ops' speed-ups on the CPU."""
    path = out / "bench.json"
    cmd = [sys.executable, "-m", "kdbench.cli", "bench", "--quick", "--json", str(path)]
    proc = run_step("kdbench-bench", cmd, out, args.timeout, env={"COLUMNS": "200"})
    if proc.rc != 0 or not path.exists():
        return [failed("kdbench bench --quick", "cpu", proc)]
    ratios = bench_ratios(json.loads(path.read_text()))
    text = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    return [Row("kdbench bench --quick", "cpu", "pass", text, proc.seconds, ratios, str(proc.log))]


def bench_ratios(data: list | dict) -> dict[str, float]:
    """Native speed-ups from ``kdbench bench --json`` rows: vs eager and compiled (KD, DKD), vs
    the six-line PyTorch version (CKA)."""
    rows = data if isinstance(data, list) else data.get("rows", data.get("results", []))
    ratios: dict[str, float] = {}
    for r in rows:
        if r.get("impl") != "native":
            continue
        op = r["case"].split(" n=")[0].split(" B=")[0]
        if r.get("speedup_vs_torch") is not None:
            ratios[f"{op} vs six-line"] = r["speedup_vs_torch"]
            continue
        ratios[f"{op} vs eager"] = r["speedup_vs_baseline"]
        if r.get("speedup_vs_compiled") is not None:
            ratios[f"{op} vs compiled"] = r["speedup_vs_compiled"]
    return ratios


def device_kernels(args: argparse.Namespace, out: Path) -> list[Row]:
    """The fused ops on ``--device`` against eager (and compiled on CUDA) PyTorch."""
    path = out / "device_bench.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "device-bench", args.device, str(path)]
    proc = run_step("device-kernels", cmd, out, args.timeout)
    if not path.exists():
        return [failed("device kernels", args.device, proc)]
    ratios, errors = json.loads(path.read_text()).values()  # an op that failed keeps the others
    text = "; ".join([", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), *errors])
    status = "pass" if proc.rc == 0 and not errors else "fail"
    return [Row("device kernels", args.device, status, text, proc.seconds, ratios, str(proc.log))]


def grid_throughput(args: argparse.Namespace, out: Path) -> list[Row]:
    """``grid_throughput.py`` at each precision setting; images/s and the ratio to fp32."""
    rows, fp32 = [], None
    for setting, flags in SETTINGS.items():
        path = out / f"throughput_{setting}.json"
        cmd = [sys.executable, "benchmarks/grid_throughput.py", "--device", args.device, *flags]
        cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--json", str(path)]
        cmd += ["--methods", args.methods, "--test-images", str(args.test_images)]
        proc = run_step(f"throughput-{setting}", cmd, out, args.timeout)
        if proc.rc != 0 or not path.exists():
            rows.append(failed("grid_throughput", setting, proc))
            continue
        nums = throughput_numbers(json.loads(path.read_text()))
        fp32 = fp32 or (nums if setting == "fp32" else None)
        text = ", ".join(f"{k} {v:,.0f} img/s" for k, v in nums.items())
        if fp32 and setting != "fp32":
            text += f" ({nums['grid shared'] / fp32['grid shared']:.2f}x fp32)"
        rows.append(Row("grid_throughput", setting, "pass", text, proc.seconds, nums, str(proc.log)))
    return rows


def throughput_numbers(data: dict) -> dict[str, float]:
    """Images/s from grid_throughput's JSON: the kd cell's training, the shared grid, bare KD."""
    cells = len(data["per_cell_img_s"])
    nums = {"grid shared": data["images_per_cell"] * cells / data["shared_s"]}
    if "kd" in data["per_cell_img_s"]:
        nums["kd cell train"] = data["per_cell_img_s"]["kd"]
    nums["bare KD"] = data["bare_kd_img_s"]
    return nums


DDP_GRID = """
name: gpu-check-ddp
output: {out}
datasets: [{{digits: {{limit: 400}}}}]
pairs: [{{teacher: {{smallcnn: {{width: 8}}}}, student: {{smallcnn: {{width: 4}}}}}}]
methods: [kd]
train: {{epochs: 2, batch_size: 64, lr: 0.1, schedule: cosine, device: {device}, gpus_per_cell: 2}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
eval: {{batch_size: 500}}
"""


def ddp_skip_reason(device: str, gpus: int, ddp_cpu: bool) -> str | None:
    """Why the 2-rank DDP cell does not run here, or None when it does."""
    if ddp_cpu:
        return None
    if device != "cuda":
        return "needs --device cuda and 2 GPUs (--ddp-cpu runs it over gloo on 2 CPU ranks)"
    if gpus < 2:
        return f"{gpus} GPU visible; the nccl cell needs 2 (CUDA_VISIBLE_DEVICES)"
    return None


def ddp_cell(args: argparse.Namespace, out: Path) -> list[Row]:
    """A kd cell on 2 ranks through ``kdbench run`` (nccl on 2 GPUs; gloo with ``--ddp-cpu``)."""
    device = "cpu" if args.ddp_cpu else "cuda"
    setting = f"2 ranks, {'gloo' if args.ddp_cpu else 'nccl'}"
    why = ddp_skip_reason(args.device, gpu_count(), args.ddp_cpu)
    if why:
        return [Row("DDP cell", setting, "skip", why, 0.0)]
    grid = out / "ddp.yaml"
    grid.write_text(DDP_GRID.format(out=out / "ddp", device=device))
    cmd = [sys.executable, "-m", "kdbench.cli", "run", str(grid), "--workers", "1"]
    proc = run_step("ddp-cell", cmd, out, args.timeout, env={"COLUMNS": "200"})
    results = [json.loads(f.read_text()) for f in (out / "ddp").glob("*/cells/*/result.json")]
    if proc.rc != 0 or len(results) != 1 or results[0]["status"] != "done":
        return [failed("DDP cell", setting, proc)]
    res = results[0]
    ddp, metrics = res["env"].get("ddp") or {}, res["metrics"]
    want = {"world": 2, "backend": "gloo" if args.ddp_cpu else "nccl"}
    nums = {"top1": metrics.get("top1"), "train_s": metrics.get("train_s"), **ddp}
    text = f"{ddp.get('world')} ranks, {ddp.get('backend')} on {ddp.get('device')}, top1 {nums['top1']}"
    status = "pass" if all(ddp.get(k) == v for k, v in want.items()) else "fail"
    return [Row("DDP cell", setting, status, text, proc.seconds, nums, str(proc.log))]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------------------- device bench


def _timed(step: Callable[[], None], device: str, repeats: int) -> float:
    """Median seconds of one call of ``step``, with the device synchronised around each run of
    ``inner`` calls (CUDA launches are asynchronous)."""
    import statistics

    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inner = 10 if device == "cuda" else 1
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _grad_step(fn: Callable, first, *rest) -> Callable[[], None]:
    def step() -> None:
        for x in first if isinstance(first, list) else [first]:
            x.grad = None
        fn(first, *rest).sum().backward()

    return step


def device_bench(device: str) -> tuple[dict[str, float], list[str]]:
    """Speed-ups of the native KD, DKD and CKA ops over eager (and compiled on CUDA) PyTorch,
    forward + backward, on ``device`` (small shapes on the CPU, a dry run); and what failed."""
    import torch

    import kdbench.kernels as K
    from kdbench.bench import eager_dkd, eager_kd, sixline_cka

    big = device == "cuda"
    B, C, n, L, d = (1024, 1000, 256, 8, 4096) if big else (64, 100, 32, 2, 64)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(B, C, generator=g) * 3).to(device).requires_grad_(True)
    t = (torch.randn(B, C, generator=g) * 3).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    xs = [torch.randn(n, d, generator=g).to(device).requires_grad_(True) for _ in range(L)]
    ys = [torch.randn(n, d, generator=g).to(device) for _ in range(L)]
    cases = {
        "KD": (K.kd_loss, eager_kd, (s, t, 4.0)),
        "DKD": (K.dkd_loss, eager_dkd, (s, t, y, 1.0, 8.0, 4.0)),
        "CKA": (K.cka_matrix, sixline_cka, (xs, ys)),
    }
    repeats = 20 if big else 3
    ratios, errors = {}, []
    for op, (native, eager, inputs) in cases.items():
        impls = {"six-line" if op == "CKA" else "eager": eager}
        if big and op != "CKA":
            impls["compiled"] = torch.compile(eager, fullgraph=True, dynamic=False)
        try:
            t_native = _timed(_grad_step(native, *inputs), device, repeats)
        except Exception as e:
            errors.append(f"{op} native: {type(e).__name__}: {e}")
            continue
        for name, fn in impls.items():
            try:
                ratios[f"{op} vs {name}"] = _timed(_grad_step(fn, *inputs), device, repeats) / t_native
            except Exception as e:  # e.g. no working compiler for torch.compile
                errors.append(f"{op} {name}: {type(e).__name__}: {str(e)[:200]}")
    return ratios, errors


# ------------------------------------------------------------------------------- summary


def environment() -> dict:
    """Where the check ran: torch, CUDA, the GPUs, the kernel backend, the git commit."""
    import torch

    import kdbench.kernels as K
    from kdbench.kernels import ops

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpu_count()}
    env["gpu"] = torch.cuda.get_device_name(0) if env["gpus"] else None
    env["backend"] = K.backend()
    env["cuda_kernels"] = bool(ops.AVAILABLE and ops.has_kernel("cuda"))
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    env["git"] = sha.stdout.strip() or None
    return env


def summary_table(rows: list[Row]) -> str:
    """The rows as one plain-text table."""
    from tabulate import tabulate

    body = [[r.step, r.setting, r.status.upper(), r.result, f"{r.seconds:.0f}"] for r in rows]
    return tabulate(body, headers=["step", "setting", "status", "result", "s"], tablefmt="github")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, help="training steps per throughput setting (cuda 100, cpu 2)")
    ap.add_argument("--batch-size", type=int, help="throughput batch size (cuda 128, cpu 16)")
    ap.add_argument("--methods", help="throughput grid methods (cuda ce,kd,dkd,dist,fitnet; cpu kd)")
    ap.add_argument("--test-images", type=int, help="throughput test images (cuda 1024, cpu 32)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per step before it fails")
    ap.add_argument("--ddp-cpu", action="store_true", help="run the DDP cell on 2 CPU ranks (gloo)")
    ap.add_argument("--out", help="keep logs and JSON of every step here (default: a temp dir)")
    ap.add_argument("--json", help="write the summary as JSON to this file")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.steps = args.steps or (100 if gpu else 2)
    args.batch_size = args.batch_size or (128 if gpu else 16)
    args.methods = args.methods or ("ce,kd,dkd,dist,fitnet" if gpu else "kd")
    args.test_images = args.test_images or (1024 if gpu else 32)
    return args


STEPS = (kernel_tests, cpu_bench, device_kernels, grid_throughput, ddp_cell)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device-bench"]:  # one step, run by the check in its own process
        ratios, errors = device_bench(argv[1])
        Path(argv[2]).write_text(json.dumps({"ratios": ratios, "errors": errors}, indent=2))
        return 1 if errors else 0
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="kdbench-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        env = environment()
    except Exception as e:  # the steps say what is broken; the header only reports it
        env = {"error": f"{type(e).__name__}: {e}", "gpus": 0}
    print(f"kdbench GPU check on {args.device}: {json.dumps(env)}; logs in {out}", flush=True)
    if args.device == "cuda" and not env["gpus"]:
        print("no GPU visible: the CUDA steps will fail (use --device cpu for the dry run)")
    rows: list[Row] = []
    t0 = time.perf_counter()
    for step in STEPS:
        s0 = time.perf_counter()
        try:
            new = step(args, out)
        except Exception as e:  # a broken step is one failed row, never the end of the check
            new = [
                Row(step.__name__, args.device, "fail", f"{type(e).__name__}: {e}", time.perf_counter() - s0)
            ]
        for r in new:
            print(f"  {r.status.upper():4s} {r.step} [{r.setting}] {r.result}", flush=True)
        rows.extend(new)
    total = time.perf_counter() - t0
    print("\n" + summary_table(rows))
    print(f"\n{sum(r.status == 'fail' for r in rows)} failed, total {total:.0f} s")
    for r in rows:
        if r.status == "fail" and r.log:
            print(f"\n--- {r.step} [{r.setting}], last lines of {r.log}:")
            print(textwrap.indent(Proc(1, Path(r.log).read_text(), 0, Path(r.log)).tail(), "  "))
    if args.json:
        report = {"device": args.device, "env": env, "total_s": total, "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
