"""Loggers (kdbench/loggers): the grid's ``loggers`` key, TensorBoard by default, W&B offline runs
and an MLflow file store read back through the real libraries, one run per cell (lockstep groups
and DDP cells included), and a logger that fails never failing its cell."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
from rich.console import Console

from kdbench.cells import Job, PluginKey
from kdbench.config import load_grid
from kdbench.errors import ConfigError
from kdbench.loggers import base as loggers_base
from kdbench.runner import execute, make_jobs, plan
from tests.conftest import write_grid

GRID = """
name: lg
output: {out}
datasets: [{{digits: {{limit: 300}}}}]
pairs: [{{teacher: {{smallcnn: {{width: 8}}}}, student: {{smallcnn: {{width: 4}}}}}}]
methods: {methods}
seeds: {seeds}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500}}
executor: {{workers: 1}}
"""


def _grid(tmp_path: Path, loggers: str | None, methods="[ce]", seeds="[0]", epochs=1, name="g.yaml") -> Path:
    body = GRID.format(out=tmp_path / "runs", methods=methods, seeds=seeds, epochs=epochs)
    return write_grid(tmp_path / name, body + (f"loggers: {loggers}\n" if loggers is not None else ""))


def _run(grid: Path, out: io.StringIO | None = None) -> dict:
    return execute(plan(load_grid(grid)), console=Console(file=out or io.StringIO(), width=400))


# ----------------------------------------------------------------------------------- W&B files


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``: a LevelDB-style log of
    protobuf records after a 7-byte header, in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST piece of a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _wandb_run(cell_dir: Path) -> dict:
    """What the cell's one offline W&B run recorded: run fields, config, history rows, files, exit."""
    (run_dir,) = (cell_dir / "wandb").glob("offline-run-*")
    (file,) = run_dir.glob("run-*.wandb")
    out: dict = {"dir": run_dir, "history": [], "exit": None}
    for rec in _wandb_records(file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(project=r.project, group=r.run_group, name=r.display_name, tags=list(r.tags))
            out["config"] = {i.key: json.loads(i.value_json) for i in r.config.update}
        elif kind == "history":
            out["history"].append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    out["files"] = sorted(p.name for p in (run_dir / "files").iterdir())
    return out


# ----------------------------------------------------------------------------------- validation


def test_unknown_logger_or_key_is_a_grid_error_with_a_suggestion(tmp_path):
    pytest.importorskip("wandb")
    with pytest.raises(ConfigError) as e:
        load_grid(_grid(tmp_path, "[tensorboard, wandbb]"))
    assert "loggers[1]: unknown logger 'wandbb' (did you mean 'wandb'?)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_grid(_grid(tmp_path, "[{wandb: {projet: p}}, {mlflow: {tracking_ur: x}}]"))
    msg = str(e.value)
    assert "'projet' is not a parameter of wandb.init (did you mean 'project'?)" in msg
    assert "loggers[1].mlflow.tracking_ur" in msg  # every problem at once, with its key path


def test_loggers_stay_out_of_cell_ids_and_travel_with_the_jobs(tmp_path):
    plain = plan(load_grid(_grid(tmp_path, None, seeds="[0, 1]")))
    logged = plan(
        load_grid(_grid(tmp_path, "[{wandb: {project: p}}, mlflow]", seeds="[0, 1]", name="l.yaml"))
    )
    assert [c.id for c in logged.cells] == [c.id for c in plain.cells]
    assert plain.grid.loggers is None
    (job, *_) = make_jobs(logged, logged.cells, {c.id: 1 for c in logged.cells}, 1)
    assert [k.name for k in job.loggers] == ["wandb", "mlflow"]
    assert job.loggers[0].params == {"project": "p"}
    assert make_jobs(plain, plain.cells, {c.id: 1 for c in plain.cells}, 1)[0].loggers is None
    assert job.only({job.ids[0]}, {job.ids[0]: 2}).loggers == job.loggers  # a retry keeps them


# ----------------------------------------------------------------------------------- tensorboard


def test_tensorboard_events_by_default_and_none_with_an_empty_list(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(_grid(tmp_path, None, epochs=2))
    (cell_dir,) = (tmp_path / "runs" / "lg" / "cells").iterdir()
    acc = EventAccumulator(str(cell_dir / "tb"))
    acc.Reload()
    assert {"train/lr", "train/loss/ce", "train/train_s"} <= set(acc.Tags()["scalars"])
    assert [s.step for s in acc.Scalars("train/loss/ce")] == [1, 2]
    rows = [json.loads(x) for x in (cell_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s.value for s in acc.Scalars("train/loss/ce")] == pytest.approx([r["loss_ce"] for r in rows])

    quiet = tmp_path / "quiet"
    quiet.mkdir()
    _run(_grid(quiet, "[]"))
    (cell_dir,) = (quiet / "runs" / "lg" / "cells").iterdir()
    assert not (cell_dir / "tb").exists() and not (cell_dir / "wandb").exists()


# ----------------------------------------------------------------------------------- W&B + MLflow


def test_wandb_and_mlflow_log_a_run_per_cell_offline(tmp_path, monkeypatch):
    """Two cells of one lockstep group (kd, dkd share a teacher, one process): one W&B offline run
    and one MLflow run each, with config, tags, per-epoch metrics, final metrics and files."""
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the plugin's own default
    grid = _grid(tmp_path, "[wandb, mlflow]", methods="[kd, dkd]", epochs=2)
    assert _run(grid)["done"] == 2
    run_dir = tmp_path / "runs" / "lg"
    cells = {
        json.loads((d / "config.json").read_text())["method"]["name"]: d
        for d in (run_dir / "cells").iterdir()
    }
    assert set(cells) == {"kd", "dkd"}

    for method, cell_dir in cells.items():
        cid = cell_dir.name
        w = _wandb_run(cell_dir)
        assert (w["project"], w["group"]) == ("lg", "lg")
        assert {f"method={method}", "dataset=digits", "seed=0", f"cell={cid}"} <= set(w["tags"])
        assert "pair=smallcnn(width=8)→smallcnn(width=4)" in w["tags"]
        assert w["config"]["cell_id"] == cid and w["config"]["method"]["name"] == method
        epochs = [h["train/epoch"] for h in w["history"] if "train/loss/ce" in h]
        assert epochs == [1, 2]
        assert w["exit"] == 0
        assert {"config.json", "metrics.jsonl", "result.json", "student.pt", "log.txt"} <= set(w["files"])
        assert "failed" not in (cell_dir / "log.txt").read_text()

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["lg"])
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    assert set(runs["tags.kdbench.cell"]) == {d.name for d in cells.values()}
    assert set(runs["params.method.name"]) == {"kd", "dkd"}
    assert set(runs["params.train.lr"]) == {"0.05"}
    client = mlflow.MlflowClient()
    for _, row in runs.iterrows():
        result = json.loads((run_dir / "cells" / row["tags.kdbench.cell"] / "result.json").read_text())
        assert row["metrics.top1"] == pytest.approx(result["metrics"]["top1"])
        history = client.get_metric_history(row["run_id"], "train/loss/ce")
        assert [m.step for m in history] == [1, 2]
        files = {a.path for a in client.list_artifacts(row["run_id"])}
        assert {"config.json", "metrics.jsonl", "result.json", "student.pt", "log.txt"} <= files


def test_a_logger_that_fails_to_start_does_not_fail_its_cell(tmp_path):
    pytest.importorskip("mlflow")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    grid = _grid(tmp_path, f"[tensorboard, {{mlflow: {{tracking_uri: {not_a_dir}/mlruns}}}}]", seeds="[0, 1]")
    out = io.StringIO()
    counts = _run(grid, out)
    assert (counts["done"], counts["failed"]) == (2, 0)
    for cell_dir in (tmp_path / "runs" / "lg" / "cells").iterdir():
        log = (cell_dir / "log.txt").read_text()
        assert "logger 'mlflow' failed to start: NotADirectoryError" in log
        assert "the cell runs on without it" in log
        assert any((cell_dir / "tb").iterdir())  # the other logger carried on
        result = json.loads((cell_dir / "result.json").read_text())
        assert result["status"] == "done"
        assert result["env"]["logger_problems"][0].startswith("logger 'mlflow' failed to start")
    # printed once for the sweep, not once per cell
    assert out.getvalue().count("logger 'mlflow' failed to start: NotADirectoryError") == 1, out.getvalue()


class _Breaks(loggers_base.Logger):
    """A logger whose library gives up after the first epoch."""

    def __init__(self) -> None:
        self.rows = 0

    def log_metrics(self, metrics, step, stage) -> None:
        self.rows += 1
        if self.rows > 1:
            raise OSError("disk quota exceeded")


def test_a_logger_failing_mid_cell_is_dropped_and_the_others_go_on(tmp_path):
    pytest.importorskip("tensorboard")
    run = loggers_base.RunInfo("c1", "a cell", "g", tmp_path, tmp_path)
    cell_loggers = loggers_base.CellLoggers(run)
    broken = _Breaks()
    from kdbench.loggers.tensorboard import TensorBoard

    cell_loggers.start("breaks", broken)
    cell_loggers.start("tensorboard", TensorBoard())
    for epoch in range(3):
        cell_loggers.log_row({"stage": "train", "epoch": epoch, "loss_kd": 1.0 / (epoch + 1)})
    assert broken.rows == 2 and [n for n, _ in cell_loggers.active] == ["tensorboard"]
    assert cell_loggers.problems == [
        "logger 'breaks' failed to log metrics: OSError: disk quota exceeded; the cell runs on without it"
    ]
    cell_loggers.finish("done", {"test": {"top1": 50.0}})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss/kd")] == [1, 2, 3]


# ----------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_a_ddp_cell_logs_one_run_from_rank_0(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    from kdbench.engine.run import run_job

    grid = _grid(tmp_path, None, epochs=2)
    grid.write_text(grid.read_text().replace("views: {}", "views: {}, gpus_per_cell: 2", 1))
    (cell,) = plan(load_grid(grid)).cells
    keys = (PluginKey(name="wandb"), PluginKey(name="mlflow"))
    (result,) = run_job(Job((cell,), (1,), str(tmp_path / "runs" / "lg"), loggers=keys))
    assert result.status == "done", result.error
    cell_dir = tmp_path / "runs" / "lg" / "cells" / cell.id
    w = _wandb_run(cell_dir)  # exactly one offline run in the cell's directory
    assert [h["train/epoch"] for h in w["history"] if "train/loss/ce" in h] == [1, 2]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "runs" / "lg" / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["lg"])
    assert list(runs["tags.kdbench.cell"]) == [cell.id]
    assert os.path.exists(cell_dir / "student.pt")
