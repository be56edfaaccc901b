"""DDP inside one cell (``train: {gpus_per_cell: 2}``) on 2 CPU ranks over gloo: sharding sees
every sample once per epoch, the cell completes and only rank 0 writes, the numbers match the
single-process run, and a killed launcher's cell resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.config import load_grid
from kdbench.engine import distributed as D
from kdbench.engine import ranks
from kdbench.engine import train as T
from kdbench.engine.data import Batches, shard_order
from kdbench.errors import ConfigError
from kdbench.runner import plan
from tests.conftest import ROOT, write_grid


def run_one(cell, run_dir: Path):
    """A cell through the engine's entry, as every executor runs it (DDP cells: their ranks)."""
    from kdbench.cells import Job
    from kdbench.engine.run import run_job

    (result,) = run_job(Job((cell,), (1,), str(run_dir)))
    return result


GRID = """
name: ddp
output: {out}
datasets: [{{digits: {{limit: 400}}}}]
pairs: [{{teacher: {{smallcnn: {{width: 8}}}}, student: {{smallcnn: {{width: 4}}}}}}]
methods: [{method}]
train: {{epochs: {epochs}, batch_size: 64, lr: 0.1, schedule: cosine, views: {{}}{extra}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine}}
eval: {{batch_size: 500, every: 1}}
"""


def _cell(tmp_path: Path, name: str, extra: str = "", epochs: int = 6, method: str = "kd"):
    g = write_grid(
        tmp_path / f"{name}.yaml",
        GRID.format(out=tmp_path / name, method=method, epochs=epochs, extra=extra),
    )
    return plan(load_grid(g)).cells[0]


def _rows(run: Path, cell) -> list[dict]:
    text = (run / "cells" / cell.id / "metrics.jsonl").read_text()
    return [json.loads(ln) for ln in text.splitlines()]


# ------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [400, 256, 260, 258])
def test_every_sample_is_seen_once_per_epoch_across_ranks(n):
    """Same epoch order on every rank; rank r takes batch[r::2] of every global batch of 64."""
    x, y = torch.randn(n, 1, 2, 2), torch.arange(n) % 10
    gen_state = torch.Generator().manual_seed(5).get_state()
    seen, counts = [], []
    for rank in range(2):
        b = Batches(TensorDataset(x, y), 64)
        b.shard = (rank, 2)
        g = torch.Generator()
        g.set_state(gen_state)
        batches = [idx for _, _, idx in b.iterate(g)]
        assert all(len(i) == 32 for i in batches[:-1]) and len(batches[-1]) >= 2
        counts.append(len(batches))
        seen.append(torch.cat(batches))
    assert counts[0] == counts[1]  # equal step counts: no rank waits in a collective alone
    allpos = torch.cat(seen)
    assert len(set(allpos.tolist())) == len(allpos)  # no sample twice
    tail = n % 64
    dropped = tail if tail < 4 else 0  # a last global batch under 2 x world samples is dropped
    assert len(allpos) == n - dropped
    # the union of the ranks' k-th batches is the single-process k-th batch
    g = torch.Generator()
    g.set_state(gen_state)
    whole = [idx for _, _, idx in Batches(TensorDataset(x, y), 64).iterate(g)]
    for k in range(counts[0]):
        a = sorted(seen[0][k * 32 : (k + 1) * 32].tolist() + seen[1][k * 32 : (k + 1) * 32].tolist())
        assert a == sorted(whole[k].tolist())


def test_a_mid_epoch_resume_skips_the_same_steps_on_every_rank():
    x, y = torch.randn(300, 1, 2, 2), torch.arange(300) % 10
    for rank in range(2):
        b = Batches(TensorDataset(x, y), 64)
        b.shard = (rank, 2)
        full = [i for _, _, i in b.iterate(torch.Generator().manual_seed(1))]
        rest = [i for _, _, i in b.iterate(torch.Generator().manual_seed(1), skip_batches=2)]
        assert [t.tolist() for t in rest] == [t.tolist() for t in full[2:]]


def test_global_batch_must_divide_by_the_ranks():
    with pytest.raises(ConfigError, match="divisible by gpus_per_cell"):
        shard_order(torch.arange(100), 63, 0, 2)


def test_per_sample_state_and_dataset_level_augmenters_are_refused(monkeypatch):
    class Bank(nn.Module):
        name = "crd"

        def __init__(self):
            super().__init__()
            self.register_buffer("memory_s", torch.zeros(400, 8))

    with pytest.raises(ConfigError, match="method crd keeps per-sample state"):
        D.refuse_per_sample_state(Bank(), 400)
    D.refuse_per_sample_state(Bank(), 399)  # not a row per sample: accepted

    monkeypatch.setattr(ranks, "_CURRENT", ranks.RankInfo(1, 2, 1, torch.device("cpu"), runtime=D))
    aug = T.DatasetAugment.__new__(T.DatasetAugment)
    with pytest.raises(ConfigError, match="dataset-level augmenters"):
        D.adapt_hooks(None, [T.LRSchedule(), aug])
    log = T.MetricsLog(Path("m.jsonl"))
    kept = D.adapt_hooks(type("S", (), {})(), [T.LRSchedule(), log])  # rank 1: no writer hooks
    assert [type(h).__name__ for h in kept] == ["DistributedSync", "LRSchedule"]


def test_batch_relational_methods_are_refused_under_ddp():
    """RKD relates the samples of a batch: on a rank it would relate only its shard (a different
    loss), so it is refused with a clear error; KD (per sample) is not."""
    from kdbench.methods.base import MethodContext
    from kdbench.methods.kd import KD
    from kdbench.methods.rkd import RKD

    ctx = MethodContext(num_classes=4, num_train=100, epochs=1, batch_size=8)
    with pytest.raises(ConfigError, match="method .* relates the samples of a batch.*gpus_per_cell: 1"):
        D.refuse_batch_relational(RKD(ctx))
    D.refuse_batch_relational(KD(ctx))


# -------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_ddp_cell_completes_writes_once_and_matches_single_process(tmp_path):
    """2 gloo ranks vs one process, same global batch and order. Without SyncBatchNorm each
    rank normalises its half batch: top-1 within 4 points (about 1.5 standard errors on the
    359 test images; measured 0-2 points)."""
    single = _cell(tmp_path, "single")
    ref = run_one(single, tmp_path / "single")
    cell = _cell(tmp_path, "ddp", ", gpus_per_cell: 2")
    assert cell.id != single.id and "gpus_per_cell" not in single.to_dict()["train"]
    res = run_one(cell, tmp_path / "ddp")
    assert res.status == "done", res.error
    assert res.env["ddp"] == {"world": 2, "backend": "gloo", "device": "cpu"}
    cdir = tmp_path / "ddp" / "cells" / cell.id
    assert sorted(p.name for p in cdir.iterdir()) == [
        "config.json",
        "log.txt",
        "metrics.jsonl",
        "result.json",
        "student.pt",
        "tb",  # TensorBoard events (rank 0)
    ]
    assert json.loads((cdir / "result.json").read_text())["metrics"]["top1"] == res.metrics["top1"]
    assert (cdir / "log.txt").read_text().count(f"cell {cell.id} attempt") == 1  # rank 0 only
    rows = _rows(tmp_path / "ddp", cell)
    assert [r["epoch"] for r in rows] == list(range(6))  # one row per epoch, rank 0 only
    assert abs(res.metrics["top1"] - ref.metrics["top1"]) <= 4.0, (res.metrics, ref.metrics)


_KILLABLE = """
import sys
from pathlib import Path
from kdbench.cells import Cell, Job
from kdbench.engine.run import run_job
import json

if __name__ == "__main__":
    cell = Cell.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    run_job(Job((cell,), (1,), sys.argv[2]))
"""


def _children(pid: int) -> list[int]:
    """The launcher's rank processes (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = []
    for k in (int(x) for x in out.split()):
        try:
            if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes():
                kids.append(k)
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_killed_launcher_resumes_from_the_checkpoint(tmp_path):
    """SIGKILL the launcher after a checkpoint exists: its ranks die with it; a rerun loads the
    checkpoint on every rank and completes. With sync_bn the DDP numbers equal the
    single-process run's (same global batch statistics): top-1 within 0.5 points."""
    extra = ", gpus_per_cell: 2, sync_bn: true"
    single = _cell(tmp_path, "single", epochs=8)
    ref = run_one(single, tmp_path / "single")
    cell = _cell(tmp_path, "ddp", extra, epochs=8)
    run = tmp_path / "ddp"
    script, cfg = tmp_path / "launch.py", tmp_path / "cell.json"
    script.write_text(_KILLABLE)
    cfg.write_text(json.dumps(cell.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(cfg), str(run)], env=env, cwd=tmp_path)
    ckpt = run / "cells" / cell.id / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint before the deadline"
    ranks = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(ranks) == 2, "expected 2 rank processes under the launcher"
    deadline = time.time() + 20  # the ranks follow their launcher (PR_SET_PDEATHSIG)
    while time.time() < deadline and any(_alive(r) for r in ranks):
        time.sleep(0.1)
    assert not any(_alive(r) for r in ranks), "a rank outlived its killed launcher"
    assert not (run / "cells" / cell.id / "result.json").exists()
    done_before = len(_rows(run, cell))
    assert done_before < 8

    res = run_one(cell, run)
    assert res.status == "done", res.error
    rows = _rows(run, cell)
    assert [r["epoch"] for r in rows] == list(range(8))
    assert not ckpt.exists()
    assert abs(res.metrics["top1"] - ref.metrics["top1"]) <= 0.5, (res.metrics, ref.metrics)
    assert abs(res.metrics["nll"] - ref.metrics["nll"]) <= 0.02


_TERMINABLE = """
import sys
from pathlib import Path
from kdbench.cells import Cell, Job
from kdbench.executors.base import run_in_worker
import json

if __name__ == "__main__":
    run_in_worker(Job((Cell.from_dict(json.loads(Path(sys.argv[1]).read_text())),), (1,), sys.argv[2]))
"""


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_the_same_step_and_resumes(tmp_path):
    """SIGTERM to the launcher (what Slurm sends): it forwards it to the ranks, they agree to
    stop before the same step, rank 0 saves a mid-epoch checkpoint, exit 143; the rerun
    continues there and ends where the single-process run ends (sync_bn, as above)."""
    single = _cell(tmp_path, "single", epochs=8)
    ref = run_one(single, tmp_path / "single")
    cell = _cell(tmp_path, "ddp", ", gpus_per_cell: 2, sync_bn: true", epochs=8)
    run = tmp_path / "ddp"
    script, cfg = tmp_path / "launch.py", tmp_path / "cell.json"
    script.write_text(_TERMINABLE)
    cfg.write_text(json.dumps(cell.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(cfg), str(run)], env=env, cwd=tmp_path)
    ckpt = run / "cells" / cell.id / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint before the deadline"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["trainer"].get("partial"), "no mid-epoch checkpoint"
    assert len(state["trainer"]["hooks"]["ddp"]["rng"]) == 2  # both ranks' RNG states
    assert not (run / "cells" / cell.id / "result.json").exists()

    res = run_one(cell, run)
    assert res.status == "done", res.error
    assert [r["epoch"] for r in _rows(run, cell)] == list(range(8))
    assert abs(res.metrics["top1"] - ref.metrics["top1"]) <= 0.5, (res.metrics, ref.metrics)


def test_a_global_batch_the_ranks_cannot_share_is_a_grid_error(tmp_path):
    from kdbench.errors import KdbenchError

    g = write_grid(
        tmp_path / "g.yaml",
        GRID.format(out=tmp_path / "r", method="kd", epochs=1, extra=", gpus_per_cell: 2").replace(
            "batch_size: 64, lr: 0.1", "batch_size: 63, lr: 0.1"
        ),
    )
    with pytest.raises(KdbenchError, match="must be a multiple of 2"):
        load_grid(g)


@pytest.mark.slow
def test_a_dead_rank_fails_the_cell_with_its_reason_and_nothing_hangs(tmp_path):
    """A rank killed mid-training (the OOM killer): rank 0's collective fails, the launcher
    records the cell as failed naming the dead rank, and returns."""
    import threading

    cell = _cell(tmp_path, "ddp", ", gpus_per_cell: 2", epochs=40)
    run = tmp_path / "ddp"
    ckpt = run / "cells" / cell.id / "checkpoint.pt"

    def kill_rank1() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not ckpt.exists():
            time.sleep(0.02)
        ranks = sorted(_children(os.getpid()))
        os.kill(ranks[-1], signal.SIGKILL)  # the later-started rank: rank 1

    t = threading.Thread(target=kill_rank1)
    t.start()
    t0 = time.time()
    res = run_one(cell, run)
    t.join()
    assert res.status == "failed"
    assert "rank 1" in res.error and "SIGKILL" in res.error, res.error
    assert time.time() - t0 < 120
    assert json.loads((run / "cells" / cell.id / "result.json").read_text())["status"] == "failed"


def test_the_engine_entry_hands_a_ddp_cell_to_the_launcher(tmp_path, monkeypatch):
    """run_job (every executor's way in) gives a DDP cell to the launcher (stubbed here); a
    lockstep group never holds one."""
    from kdbench.cells import CellResult, Job
    from kdbench.engine import lockstep
    from kdbench.engine.run import run_job

    cell = _cell(tmp_path, "ddp", ", gpus_per_cell: 2")
    calls = []

    def fake(c, run_dir, progress=None, attempt=1, loggers=None):
        calls.append(c.id)
        return CellResult(cell=c, status="done", metrics={"top1": 1.0}, attempt=attempt)

    monkeypatch.setattr(D, "launch_cell", fake)
    assert lockstep.group_key(cell) is None and lockstep.plan_groups([cell, cell]) == [[cell], [cell]]
    (r,) = run_job(Job((cell,), (1,), str(tmp_path / "r")))
    assert r.status == "done" and r.metrics == {"top1": 1.0} and calls == [cell.id]


_SINGLE = """
import json, sys
from pathlib import Path
from kdbench.cells import Cell, Job
from kdbench.engine.run import run_job

cell = Cell.from_dict(json.loads(Path(sys.argv[1]).read_text()))
(r,) = run_job(Job((cell,), (1,), sys.argv[2]))
print(r.status, "kdbench.engine.distributed" in sys.modules)
"""


def test_a_single_process_cell_never_enters_the_ddp_module(tmp_path):
    cell = _cell(tmp_path, "one", "", epochs=1)
    cfg = tmp_path / "cell.json"
    cfg.write_text(json.dumps(cell.to_dict()))
    out = subprocess.run(
        [sys.executable, "-c", _SINGLE, str(cfg), str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.stdout.split() == ["done", "False"], out.stderr[-2000:]


def test_ddp_keys_in_teacher_train_are_rejected_not_ignored(tmp_path):
    from kdbench.errors import KdbenchError

    text = GRID.format(out=tmp_path / "r", method="kd", epochs=1, extra="").replace(
        "teacher_train: {epochs: 1,", "teacher_train: {gpus_per_cell: 2, epochs: 1,"
    )
    with pytest.raises(KdbenchError, match="teacher_train.gpus_per_cell.*DDP is for `train`"):
        load_grid(write_grid(tmp_path / "g.yaml", text))


_RANK_SCRIPT = """
import sys, json
from pathlib import Path
from kdbench.cells import Cell, Job
from kdbench.executors.base import run_in_worker

if __name__ == "__main__":
    cell = Cell.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    outs = run_in_worker(Job((cell,), (1,), sys.argv[2]))  # rank 0's result; none on the others
    print("RESULT", json.dumps([{"status": o.status, "error": o.error} for o in outs]))
"""


@pytest.mark.slow
def test_ranks_started_by_an_outside_launcher_run_the_cell(tmp_path):
    """torchrun sets RANK/WORLD_SIZE/MASTER_ADDR as submitit's TorchDistributedEnvironment does
    for Slurm tasks: each process runs run_in_worker and acts as its rank; rank 0 writes."""
    cell = _cell(tmp_path, "ddp", ", gpus_per_cell: 2, sync_bn: true", epochs=2)
    run = tmp_path / "ddp"
    script, cfg = tmp_path / "rank.py", tmp_path / "cell.json"
    script.write_text(_RANK_SCRIPT)
    cfg.write_text(json.dumps(cell.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(D._free_port())]
    proc = subprocess.run(
        [sys.executable, *args, str(script), str(cfg), str(run)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert sorted(len(x) for x in lines) == [0, 1] and [x for x in lines if x][0][0]["status"] == "done"
    res = json.loads((run / "cells" / cell.id / "result.json").read_text())
    assert res["status"] == "done" and res["env"]["ddp"]["world"] == 2
    assert [r["epoch"] for r in _rows(run, cell)] == [0, 1]
