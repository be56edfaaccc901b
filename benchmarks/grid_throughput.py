"""Grid throughput: the same grid run cell by cell and with its teacher shared (lockstep).

Runs ce, kd, dkd, dist, fitnet (``--methods``) on one teacher→student pair (resnet56→resnet20 by
default) for a fixed number of steps on CIFAR-shaped data, three ways, in one process:

1. unshared: every cell alone (``run_cell``), as ``kdbench run`` does by default;
2. shared: the cells as one lockstep group (``run_group``, ``executor: {share_teacher: true}``),
   the teacher's forward computed once per batch;
3. a bare PyTorch KD loop of the same models on the same data (index, normalise, the same
   flip+crop, teacher forward under no_grad, student forward, 0.1·CE + 0.9·KL(T=4), SGD step).

Prints images/s of the whole grid both ways and their ratio (wall time, set-up and evaluation
included), the same for training alone (unshared: the cells' ``train_s``; shared: the group's
step time, :func:`run_group`'s ``timings``), each cell's training images/s in the unshared run,
and the kd cell against the bare loop (timed before and after the grid, averaged; it uses eager
``F.kl_div`` where the kd cell uses the fused ``kernels.kd_loss``).

It also prints the bound sharing can reach (Amdahl): with ``T`` one cell's teacher forwards
(timed inside the shared run's steps, the taps the methods read), the unshared cells' training
``Σ train_s`` becomes at best ``Σ train_s − (n_teacher_cells − 1)·T`` shared, since cells without
a teacher (ce) share nothing and every other cell keeps its student's part. ``--methods`` without
ce (``kd,dkd,dist,fitnet``) measures a grid where every cell has the teacher. ``--check`` also
asserts that the shared run gave bit-identical metrics (CPU). The data is random
CIFAR-100-format files (``--data random``, written to a temp dir) or a real copy
(``--data /path/to/cifar-100-python``). The teacher is the untrained model (``source: loaded``):
its speed is what matters here.

    OMP_NUM_THREADS=2 python benchmarks/grid_throughput.py --threads 2 --steps 50
    python benchmarks/grid_throughput.py --methods kd,dkd,dist,fitnet --steps 30
    python benchmarks/grid_throughput.py --teacher resnet32x4 --student resnet8x4 --threads 2
    python benchmarks/grid_throughput.py --device cuda --precision bf16 --channels-last --steps 200
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

METHODS = "ce,kd,dkd,dist,fitnet"


def write_random_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """CIFAR-100 python-format files of random images (what the ``cifar100`` plugin reads)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, size=n)],
            b"coarse_labels": [0] * n,
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"]}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


def grid_yaml(args: argparse.Namespace, root: Path, out: Path, n_train: int, n_test: int) -> str:
    train = {
        "epochs": 1,
        "batch_size": args.batch_size,
        "lr": 0.05,
        "schedule": "constant",
        "augment": args.augment,
        "views": {},
        "device": args.device,
        "checkpoint_every": 0,
    }
    if args.precision != "fp32":
        train["precision"] = args.precision
    if args.channels_last:
        train["channels_last"] = True
    if args.compile:
        train["compile"] = True
    grid = {
        "name": "throughput",
        "output": str(out),
        "datasets": [{"cifar100": {"root": str(root), "limit": max(n_train, n_test)}}],
        "pairs": [{"teacher": args.teacher, "student": args.student, "source": "loaded"}],
        "methods": args.methods.split(","),
        "seeds": [0],
        "train": train,
        "teacher_train": {"epochs": 0, "batch_size": args.batch_size, "views": {}},
        "eval": {"batch_size": 512},
        "executor": {"threads": args.threads},
    }
    return json.dumps(grid)  # JSON is YAML


def _imgs(n: int, s: float) -> str:
    return f"{n / s:8.1f} img/s" if s > 0 else "     n/a"


def bare_kd_loop(args: argparse.Namespace, cell, steps: int) -> float:
    """Seconds of ``steps`` plain-PyTorch KD steps of the cell's models on the cell's data."""
    from kdbench.engine.build import build_augmenter, build_model, resolve_device
    from kdbench.engine.cell import _plain, load_dataset

    device = resolve_device(args.device)
    ds = load_dataset(cell.dataset)
    split = ds.split("train")  # NormalizedImages: uint8 images, normalised per batch
    torch.manual_seed(0)
    teacher, _ = build_model(_plain(cell.teacher.model), ds.num_classes, ds.in_channels)
    student, _ = build_model(_plain(cell.student), ds.num_classes, ds.in_channels)
    teacher.to(device).eval()
    student.to(device).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    aug = build_augmenter({"name": args.augment, "params": {}}, split)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    n, b = len(split), args.batch_size
    order = torch.randperm(n, generator=gen)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    T = 4.0

    def step(i: int) -> None:
        idx = order[(i * b) % n : (i * b) % n + b]
        x, y = split[idx]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = aug(x, gen)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            kd = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
            loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    for i in range(min(3, steps)):  # warm-up
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--methods", default=METHODS, help=f"comma-separated (default {METHODS})")
    ap.add_argument("--steps", type=int, default=50, help="training steps per cell (one epoch)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--test-images", type=int, default=256)
    ap.add_argument("--augment", default="flip_crop")
    ap.add_argument("--data", default="random", help="'random' or a cifar-100-python directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--check", action="store_true", help="assert shared metrics == unshared")
    ap.add_argument("--keep", help="keep the run directories here")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args(argv)

    from kdbench.config import load_grid
    from kdbench.engine.cell import load_dataset, prepare_teacher, run_cell
    from kdbench.engine.lockstep import SharedTeachers, run_group
    from kdbench.runner import plan

    torch.set_num_threads(args.threads)
    work = Path(args.keep or tempfile.mkdtemp(prefix="kdbench-throughput-"))
    n_train, n_test = args.steps * args.batch_size, args.test_images
    root = Path(args.data) if args.data != "random" else write_random_cifar100(work / "data", n_train, n_test)
    gpath = work / "grid.yaml"
    gpath.write_text(grid_yaml(args, root, work / "runs", n_train, n_test))
    cells = plan(load_grid(gpath)).cells
    load_dataset(cells[0].dataset)  # read once, outside the timings
    dirs = {"unshared": work / "runs" / "unshared", "shared": work / "runs" / "shared"}
    for d in dirs.values():
        prepare_teacher(cells[-1], d)  # the (untrained) teacher and its cached evaluation
    n_imgs = len(load_dataset(cells[0].dataset).split("train"))

    print(
        f"{args.teacher}→{args.student}, {len(cells)} cells ({args.methods}), {args.steps} steps of "
        f"{args.batch_size} ({n_imgs} images), {args.device}, {args.threads} thread(s), {args.precision}"
        + (", channels_last" if args.channels_last else "")
        + (", compile" if args.compile else "")
    )
    t_bare_before = bare_kd_loop(args, cells[0], args.steps)

    t0 = time.perf_counter()
    alone = [run_cell(c, dirs["unshared"]) for c in cells]
    t_unshared = time.perf_counter() - t0
    teachers = SharedTeachers()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shared = run_group(cells, dirs["shared"], teachers=teachers, timings=timings)
    t_shared = time.perf_counter() - t0
    # the bare loop runs before and after the grid; its mean time evens out drifts in machine load
    t_bare_after = bare_kd_loop(args, cells[0], args.steps)
    t_bare = (t_bare_before + t_bare_after) / 2
    bad = [r for r in alone + shared if r.status != "done"]
    if bad:
        print("failed:", *(f"{r.cell.method.label}: {r.error}" for r in bad), sep="\n  ")
        return 1

    total = n_imgs * len(cells)
    stats = {k: round(v, 2) if isinstance(v, float) else v for k, v in teachers.stats.items()}
    print(f"\ngrid, unshared: {t_unshared:7.2f} s  {_imgs(total, t_unshared)}")
    print(f"grid, shared:   {t_shared:7.2f} s  {_imgs(total, t_shared)}  ({stats})")
    print(f"shared / unshared speed-up: {t_unshared / t_shared:.2f}x  (wall, with set-up + eval)")
    # training alone: the unshared cells' train_s; the group's step time, scaled from the calls
    # that only stepped (every step but each cell's last, whose call also evaluates the cell)
    train_unshared = sum(r.metrics["train_s"] for r in alone)
    n_steps = timings["step_calls"] + len(cells)
    train_shared = timings["steps_s"] * n_steps / max(timings["step_calls"], 1)
    other_unshared = t_unshared - train_unshared
    other_shared = t_shared - train_shared
    print(
        f"training only: unshared {train_unshared:.2f} s, shared {train_shared:.2f} s, "
        f"speed-up {train_unshared / train_shared:.2f}x"
    )
    print(
        f"set-up + evaluation: unshared {other_unshared:.2f} s, shared {other_shared:.2f} s "
        f"(set-up {timings['setup_s']:.2f} s, last steps + evaluation {timings['finish_s']:.2f} s)"
    )
    # Amdahl: one teacher forward per batch for the whole group, everything else unchanged. T: a
    # cell's teacher forwards (one per step), timed inside the shared run's steps (what they cost
    # between student steps; a loop of teacher forwards alone runs faster, its weights in cache)
    n_teacher = sum(1 for c in cells if c.uses_teacher)
    fwd = timings["teacher_step_forwards"]
    t_teacher = timings["teacher_steps_s"] / fwd * args.steps if fwd else 0.0
    ideal = train_unshared - max(n_teacher - 1, 0) * t_teacher
    bound = train_unshared / ideal if ideal > 0 else float("nan")
    by_label = {r.cell.method.label: r.metrics["train_s"] for r in alone}
    t_kd_ce = by_label["kd"] - by_label["ce"] if {"kd", "ce"} <= by_label.keys() else None
    print(
        f"teacher forwards of one cell (T): {t_teacher:.2f} s"
        + (f" (kd - ce train_s: {t_kd_ce:.2f} s)" if t_kd_ce is not None else "")
        + f"; training bound with {n_teacher} cells sharing T: {ideal:.2f} s, {bound:.2f}x "
        f"(reached {train_unshared / train_shared / bound:.0%} of it)"
    )
    print("\nper cell, unshared (training only):")
    per = {}
    for r in alone:
        label, s = r.cell.method.label, r.metrics["train_s"]
        per[label] = n_imgs / s
        print(f"  {label:10s} {s:7.2f} s  {_imgs(n_imgs, s)}")
    bare_imgs = _imgs(args.steps * args.batch_size, t_bare)
    print(
        f"  {'bare KD':10s} {t_bare:7.2f} s  {bare_imgs}  (plain PyTorch loop; "
        f"{t_bare_before:.2f} s before, {t_bare_after:.2f} s after the grid)"
    )
    ratio = None
    if "kd" in per:
        ratio = per["kd"] / (args.steps * args.batch_size / t_bare)
        print(f"harness kd / bare KD loop: {ratio:.3f}x")
    ok = True
    if args.check:
        for a, b in zip(alone, shared, strict=True):
            ma = {k: v for k, v in a.metrics.items() if not k.endswith("_s")}
            mb = {k: v for k, v in b.metrics.items() if not k.endswith("_s")}
            if ma != mb:
                ok = False
                print(f"MISMATCH {a.cell.method.label}: {ma} vs {mb}")
        print("shared metrics == unshared:", ok)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "images_per_cell": n_imgs,
                    "unshared_s": t_unshared,
                    "shared_s": t_shared,
                    "speedup": t_unshared / t_shared,
                    "train_unshared_s": train_unshared,
                    "train_shared_s": train_shared,
                    "train_speedup": train_unshared / train_shared,
                    "teacher_forward_s": t_teacher,
                    "amdahl_train_bound": bound,
                    "group_timings": timings,
                    "per_cell_img_s": per,
                    "bare_kd_img_s": args.steps * args.batch_size / t_bare,
                    "kd_vs_bare": ratio,
                    "teacher_forwards": teachers.stats,
                    "bit_identical": ok if args.check else None,
                },
                indent=2,
            )
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
