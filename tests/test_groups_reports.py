"""Group and shift reports from fabricated stores, and one tiny end-to-end grid through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdbench.reports import ReportArgs, RunData, load
from kdbench.reports import shift as shift_report
from tests.conftest import kdbench_cli, store_row, write_grid


def _cell(i: int, method: str, seed: int, metrics: dict, teacher: bool = True) -> dict:
    return store_row(i, method, seed, metrics, "spurious", teacher)


def _group_metrics(a0: float, a1: float, extra: dict | None = None) -> dict:
    m = {
        "top1": (a0 + a1) / 2,
        "group/2_red/acc": a0,
        "group/2_red/n": 10.0,
        "group/10_red/acc": a1,
        "group/10_red/n": 5.0,
        "worst_group": min(a0, a1),
        "mean_group": (a0 + a1) / 2,
        "train/group/2_red/acc": 100.0,
        "train/group/10_red/acc": 90.0,
    }
    return {**m, **(extra or {})}


@pytest.fixture
def run(tmp_path: Path) -> RunData:
    kd_extra = {
        "group/2_red/teacher_acc": 90.0,
        "group/2_red/agreement": 80.0,
        "group/2_red/err_inherited": 10.0,
        "group/2_red/err_own": 30.0,
        "group/10_red/teacher_acc": 90.0,
        "group/10_red/agreement": 90.0,
        "group/10_red/err_inherited": 0.0,
        "group/10_red/err_own": 20.0,
        "scan/max": 2.5,
        "scan/mean": 0.4,
        "scan/top1/dim": 7.0,
        "scan/top1/score": 2.5,
        "dfr/group/2_red/acc": 75.0,
        "dfr/group/10_red/acc": 85.0,
        "dfr/worst_group": 75.0,
    }
    cells = [
        _cell(0, "ce", 0, _group_metrics(50.0, 90.0), teacher=False),
        _cell(1, "ce", 1, _group_metrics(70.0, 90.0), teacher=False),
        _cell(2, "kd", 0, _group_metrics(60.0, 80.0, kd_extra)),
    ]
    teachers = {
        "t0": {"id": "t0", "metrics": _group_metrics(90.0, 90.0, {"scan/max": 0.3, "scan/mean": 0.1})}
    }
    return RunData(tmp_path, cells, teachers, {})


def test_groups_table_rows_columns_and_spread(run: RunData, tmp_path: Path):
    out = load("groups")(run, ReportArgs(kind="groups", plot=str(tmp_path / "g.png")))
    header = next(ln for ln in out.splitlines() if ln.startswith("| method"))
    # natural group order, sizes in the header
    assert header.index("2_red (n=10)") < header.index("10_red (n=5)")
    rows = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| ") and "method" not in ln]
    assert rows == ["teacher", "ce", "kd", "kd+dfr"]
    ce = next(ln for ln in out.splitlines() if ln.startswith("| ce "))
    assert "60.0 ± 14.1" in ce  # mean ± sample std of 50 and 70
    assert (tmp_path / "g.png").stat().st_size > 1000
    data = json.loads(load("groups")(run, ReportArgs(kind="groups", fmt="json")))
    kd_dfr = next(r for r in data[0]["rows"] if r["method"] == "kd+dfr")
    assert kd_dfr["metrics"]["worst_group"]["mean"] == 75.0
    latex = load("groups")(run, ReportArgs(kind="groups", fmt="latex"))
    assert r"\begin{tabular}" in latex and "2\\_red" in latex
    prose = [ln for ln in latex.splitlines() if ln and not ln.startswith("\\") and "&" not in ln]
    assert prose and all(ln.startswith("% ") for ln in prose)  # compiles as is


def test_shift_decomposition_and_scan(run: RunData):
    recs = shift_report.analyse(shift_report.build_board(run, ReportArgs()), ReportArgs())
    kd = {g["group"]: g for g in recs[0]["groups"]["kd"]}
    assert kd["2_red"]["err"] == 40.0 and kd["2_red"]["inherited"] + kd["2_red"]["own"] == 40.0
    assert kd["2_red"]["teacher_err"] == 10.0 and kd["2_red"]["disagreement"] == 20.0
    assert kd["10_red"]["gap"] == 10.0  # train 90 − test 80
    ce = {g["group"]: g for g in recs[0]["groups"]["ce"]}
    assert ce["2_red"]["teacher_err"] == 10.0  # from the teacher's own row
    assert "kd+dfr" not in recs[0]["groups"]
    assert recs[0]["scan"]["kd"]["top"] == [(7, 2.5)] and recs[0]["scan"]["teacher"]["max"] == 0.3
    text = load("shift")(run, ReportArgs(kind="shift"))
    assert "inherited" in text and "7:2.50" in text


GRID = """
name: groups
output: {out}
datasets:
  - {{spurious: {{base: digits, strength: 0.95, n_attr: 2, val_fraction: 0.2}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
    teacher_dataset: {{spurious: {{base: digits, n_attr: 2, val_fraction: 0.2, variant: balanced}}}}
methods: [ce, kd]
seeds: [0]
train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500, val_fraction: 0.2, dfr: true}}
"""


@pytest.mark.slow
def test_spurious_grid_end_to_end(tmp_path: Path):
    grid = write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs"))
    env = {"OMP_NUM_THREADS": "1"}
    r = kdbench_cli("run", str(grid), env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    run_dir = tmp_path / "runs" / "groups"
    result = json.loads(next((run_dir / "cells").glob("*/result.json")).read_text())
    m = result["metrics"]
    assert {
        "worst_group",
        "mean_group",
        "adj_avg_acc",
        "test_reversed/worst_group",
        "train/worst_group",
    } <= set(m)
    assert m["dfr/on_val"] == 1.0 and "dfr/worst_group" in m and "dfr/val/worst_group" not in m
    assert m["worst_group"] <= m["mean_group"] <= 100.0
    # the teacher trained on the balanced variant: its training split has every group equally
    teacher = json.loads(next((run_dir / "teachers").glob("*/result.json")).read_text())
    assert teacher["teacher"]["dataset"]["params"]["variant"] == "balanced"
    tm = teacher["metrics"]
    for c in range(10):  # within every class, both colours equally often
        assert abs(tm[f"train/group/{c}_red/n"] - tm[f"train/group/{c}_green/n"]) <= 1
    assert "scan/max" in teacher["metrics"]
    lb = kdbench_cli("report", str(run_dir), "--metric", "worst_group", env=env)
    assert lb.returncode == 0, lb.stderr
    assert "ce+dfr" in lb.stdout and "worst" in lb.stdout
    png = tmp_path / "groups.png"
    g = kdbench_cli("report", str(run_dir), "--kind", "groups", "--plot", str(png), env=env)
    assert g.returncode == 0, g.stderr
    assert "0_red (n=" in g.stdout and png.exists()
    s = kdbench_cli("report", str(run_dir), "--kind", "shift", env=env)
    assert s.returncode == 0, s.stderr
    assert "inherited" in s.stdout and "spurious-feature scan" in s.stdout


WATERBIRDS_GRID = """
name: wb
output: {out}
datasets:
  - {{waterbirds: {{root: {root}, image_size: 16}}}}
pairs:
  - teacher: {{smallcnn: {{width: 4}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: [ce]
train: {{epochs: 1, batch_size: 8, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 64, val_fraction: 0.1, dfr: true}}
"""


@pytest.mark.slow
def test_waterbirds_grid_uses_its_own_val_split_for_dfr(tmp_path: Path):
    from tests.test_groups_datasets import make_waterbirds

    root = make_waterbirds(tmp_path / "wb")
    grid = write_grid(tmp_path / "g.yaml", WATERBIRDS_GRID.format(out=tmp_path / "runs", root=root))
    r = kdbench_cli("run", str(grid), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr + r.stdout
    m = json.loads(next((tmp_path / "runs" / "wb" / "cells").glob("*/result.json")).read_text())["metrics"]
    assert m["group/waterbird_land/n"] == 3.0 and m["val/group/landbird_water/n"] == 3.0
    assert m["dfr/on_val"] == 1.0 and "dfr/worst_group" in m and "dfr/val/worst_group" not in m
    assert m["train/group/waterbird_water/n"] == 3.0
