"""Fast by default: whole ``kdbench run`` processes, default settings against one core unshared.

Runs one grid (ce, kd, dkd, dist, fitnet on resnet56→resnet20, MNIST-5k, 1 epoch by default) as a
user would, each setting in a fresh run directory whose teacher cache is already filled (the
teacher is trained once, before any timing, so every setting loads the same teacher checkpoint):

- ``default``: no executor keys (``workers: auto``, ``share_teacher: true``);
- ``workers1``: ``executor: {workers: 1}`` (one process, teacher shared);
- ``unshared``: ``executor: {workers: 1, share_teacher: false}`` (one process, cell by cell).

Prints each setting's wall time (the whole ``kdbench run`` process, start-up and evaluation
included), the ratios the issue asks for, the run summary line (what ``workers: auto`` chose, the
teacher forwards reused), and checks that every setting gave bitwise-equal metrics. Run it on an
otherwise idle machine:

    python benchmarks/fast_default.py                 # the 5-method grid
    python benchmarks/fast_default.py --grid examples/quickstart.yaml --settings default,workers1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = """\
name: fast-default
output: {out}
datasets: [mnist5k]
pairs:
  - {{teacher: resnet56, student: resnet20}}
methods: [{methods}]
seeds: [0]
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
eval: {{batch_size: 1000}}
"""

SETTINGS = {
    "default": "",
    "workers1": "executor: {workers: 1}\n",
    "unshared": "executor: {workers: 1, share_teacher: false}\n",
}


def kdbench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kdbench.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def metrics(run_dir: Path) -> dict[str, dict]:
    timing = {"train_s", "eval_s", "wall_s"}
    out = {}
    for f in sorted(run_dir.glob("cells/*/result.json")):
        r = json.loads(f.read_text())
        out[r["cell"]["id"]] = {k: v for k, v in r["metrics"].items() if k not in timing}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="ce, kd, dkd, dist, fitnet")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--grid", help="an existing grid file instead of the 5-method grid")
    ap.add_argument("--settings", default="default,workers1,unshared")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (the median is shown)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kdbench-fast-"))
    try:
        if args.grid:
            base = Path(args.grid).read_text()
            base = "\n".join(line for line in base.splitlines() if not line.startswith("executor:")) + "\n"
        else:
            base = GRID.format(out=tmp, methods=args.methods, epochs=args.epochs)
        # the teacher, trained once, outside every timing
        warm = tmp / "warm.yaml"
        warm.write_text(base)
        r = kdbench("run", str(warm), "--out", str(tmp / "warm"), "--workers", "1")
        if r.returncode != 0:
            sys.exit(f"warm-up run failed:\n{r.stderr}")
        teachers = tmp / "warm" / "teachers"

        times: dict[str, list[float]] = {}
        said: dict[str, str] = {}
        got: dict[str, dict] = {}
        for name in args.settings.split(","):
            for i in range(args.repeat):
                grid = tmp / f"{name}.yaml"
                grid.write_text(base + SETTINGS[name])
                out = tmp / f"{name}-{i}"
                shutil.copytree(teachers, out / "teachers")
                t0 = time.perf_counter()
                r = kdbench("run", str(grid), "--out", str(out))
                times.setdefault(name, []).append(time.perf_counter() - t0)
                if r.returncode != 0:
                    sys.exit(f"{name} failed:\n{r.stderr}")
                said[name] = " | ".join(
                    line.strip()
                    for line in r.stderr.splitlines()
                    if "workers auto" in line or line.strip().startswith("done ")
                )
                got[name] = metrics(out)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{'setting':<10} {'wall s':>8}  summary")
        for k, v in med.items():
            print(f"{k:<10} {v:8.1f}  {said[k]}")
        for a, b in (("default", "unshared"), ("workers1", "unshared"), ("default", "workers1")):
            if a in med and b in med:
                print(f"{a} vs {b}: {med[b] / med[a]:.2f}x")
        ref = next(iter(got.values()))
        same = all(m == ref for m in got.values()) and len(ref) > 0
        print(f"metrics bitwise equal across settings ({len(ref)} cells): {same}")
        if not same:
            sys.exit(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
