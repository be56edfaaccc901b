"""One grid under every executor: wall time, same numbers, and what a sweep leaves on disk.

Runs the same grid (ce and kd on scikit-learn's digits or ``--dataset``, smallcnn 2w→w for
``--width`` w, ``--seeds`` seeds, ``--epochs`` epochs) with ``kdbench run`` (a fresh
interpreter each, as a user runs it) under

- ``inline``: ``executor: {kind: local}``
- ``local2``: ``executor: {kind: local, workers: 2}``
- ``submitit``: ``executor: {kind: submitit, cluster: local}`` (real job folders and subprocesses)
- ``ray``: ``executor: {kind: ray, address: local, num_cpus: 2}``

and prints each one's wall time (interpreter start to exit, teacher training included), whether
its metrics equal the inline run's bit for bit, and the files each run directory holds per cell,
per teacher and in total, scaled to a 1000-cell sweep. Run it alone on the machine:

    OMP_NUM_THREADS=1 python benchmarks/executors.py --seeds 3 --epochs 2
    OMP_NUM_THREADS=1 python benchmarks/executors.py --dataset "{mnist5k: {}}" --width 16 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = """\
name: bench
output: {out}
datasets:
  - {dataset}
pairs:
  - teacher: {{smallcnn: {{width: {tw}}}}}
    student: {{smallcnn: {{width: {sw}}}}}
methods: [ce, kd]
seeds: {seeds}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 2, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500}}
executor: {executor}
"""

EXECUTORS = {
    "inline": "{kind: local}",
    "local2": "{kind: local, workers: 2}",
    "submitit": "{kind: submitit, cluster: local, time_min: 30, poll_s: 0.5}",
    "ray": "{kind: ray, address: local, num_cpus: 2}",
}


def metrics(run_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(run_dir.glob("cells/*/result.json")):
        r = json.loads(f.read_text())
        out[f.parent.name] = {k: v for k, v in (r.get("metrics") or {}).items() if not k.endswith("_s")}
    return out


def files(run_dir: Path) -> dict[str, int]:
    """Files under the run directory: in cell folders, teacher folders, executor folders, the rest."""
    counts = {"cells": 0, "teachers": 0, "executor": 0, "other": 0}
    for p in run_dir.rglob("*"):
        if not p.is_file():
            continue
        top = p.relative_to(run_dir).parts[0]
        key = top if top in ("cells", "teachers") else "executor" if top in ("submitit", "ray") else "other"
        counts[key] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dataset", default="{digits: {limit: 600}}", help="a grid dataset entry")
    ap.add_argument("--width", type=int, default=4, help="student width (the teacher's is twice it)")
    ap.add_argument("--only", help="comma-separated executors (default: all)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(EXECUTORS)
    seeds = list(range(args.seeds))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for name in names:
            out = Path(tmp) / name
            grid = Path(tmp) / f"{name}.yaml"
            text = GRID.format(
                out=out,
                seeds=seeds,
                epochs=args.epochs,
                executor=EXECUTORS[name],
                dataset=args.dataset,
                tw=2 * args.width,
                sw=args.width,
            )
            grid.write_text(text)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "kdbench.cli", "run", str(grid), "--out", str(out / "run")],
                env=env,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                print(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}", file=sys.stderr)
                continue
            m = metrics(out / "run")
            base = base if base is not None else m
            n_cells = len(m)
            f = files(out / "run")
            rows.append(
                {
                    "executor": name,
                    "wall_s": round(wall, 1),
                    "cells": n_cells,
                    "same_numbers_as_first": m == base,
                    "files": f,
                    "files_per_cell": round((f["cells"] + f["executor"]) / max(n_cells, 1), 1),
                    "files_1000_cells": round((f["cells"] + f["executor"]) / max(n_cells, 1) * 1000)
                    + f["teachers"]
                    + f["other"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'executor':10} {'wall s':>7} {'same':>5} {'files/cell':>10} {'files, 1000 cells':>18}")
    for r in rows:
        print(
            f"{r['executor']:10} {r['wall_s']:7.1f} {str(r['same_numbers_as_first']):>5} "
            f"{r['files_per_cell']:10.1f} {r['files_1000_cells']:18d}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
