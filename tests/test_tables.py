"""Every report kind in every format, against golden files (tests/fixtures/reports/).

The fabricated runs below cover what the report kinds show: reference rows, failed and
pending cells, selection rules over per-epoch rows, significance against a baseline, the
paper column, groups with DFR rows, the shift analysis and corruptions. The golden files were
written by the reports before they were rebuilt on tables; any change to them is a fix named
in the commit that makes it. ``KDBENCH_UPDATE_GOLDEN=1`` rewrites them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kdbench.reports import FORMATS, ReportArgs, RunData, load
from tests.conftest import store_row

GOLDEN = Path(__file__).parent / "fixtures" / "reports"
#: the text formats compared byte for byte; html embeds matplotlib SVG that changes with the
#: matplotlib version, so its page is checked in a browser instead (tests/test_report_html.py)
TEXT_FORMATS = tuple(f for f in FORMATS if f != "html")
ENV = {"threads": 2, "torch": "2.5.1", "kernels": "cpp", "cuda": False}
NOISE = [0.3, -0.2, 0.1, -0.4, 0.25]


def _epochs(run_dir: Path, cell_id: str, final: float) -> None:
    """Per-epoch rows whose validation peaks at the second of three epochs."""
    rows = [
        {"stage": "train", "epoch": e, "test/top1": final - d, "val/top1": final - v, "eval_s": 0.5}
        for e, (d, v) in enumerate(((3.0, 2.0), (1.0, 0.0), (0.0, 1.0)))
    ]
    d = run_dir / "cells" / cell_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def leaderboard_run(run_dir: Path) -> RunData:
    """Teacher, ce, kd (seed 2 missing), dkd close to ce, a failed and a pending cell, two
    datasets, published numbers."""
    cells, i = [], 0
    plan = {"ce": (80.0, [0, 1, 2, 3]), "kd": (85.0, [0, 1, 3]), "dkd": (80.1, [0, 1, 2, 3])}
    for dataset in ("cifar_x", "digits"):
        for method, (base, seeds) in plan.items():
            for seed in seeds:
                top1 = base + NOISE[seed] + (5.0 if dataset == "digits" else 0.0)
                metrics = {"top1": top1, "ece": 3.0 - seed / 2, "wall_s": 2.0}
                row = store_row(i, method, seed, metrics, dataset)
                row["env"] = ENV
                row["config"]["train"]["epochs"] = 3
                cells.append(row)
                _epochs(run_dir, row["id"], top1)
                i += 1
    failed = store_row(i, "fit_net", 0, {}, "digits")
    failed.update(status="failed", error="CUDA out of memory", metrics=None)
    pending = store_row(i + 1, "fit_net", 1, {}, "cifar_x")
    pending.update(status="pending", metrics=None)
    teachers = {"t0": {"id": "t0", "metrics": {"top1": 97.5, "ece": 1.0}, "wall_s": 30.0}}
    grid = {
        "reference": {
            "kd": {"source": "KD paper, table 1 (50% of 100#)", "T->S": 84.1},
            "dkd": {"digits: T→S": {"value": 91.0, "source": "DKD paper"}},
        }
    }
    return RunData(run_dir, cells + [failed, pending], teachers, grid)


def stats_run(run_dir: Path) -> RunData:
    """Five seeds of ce; kd misses seed 2; dkd equals ce; at is ce + 0.5 on every seed; fitnet and
    rkd differ a little (fitnet: p = 0.017 alone, not significant after Holm over 4 tests)."""
    ce = [80.0, 80.6, 79.5, 80.2, 79.9]
    plan = {
        "ce": ce,
        "kd": [82.1, 82.4, None, 81.9, 82.6],
        "dkd": ce,
        "at": [v + 0.5 for v in ce],
        "fitnet": [80.4, 80.9, 79.9, 80.3, 80.6],
        "rkd": [80.3, 80.9, 79.4, 80.6, 80.2],
    }
    cells = []
    for method, values in plan.items():
        for seed, v in enumerate(values):
            if v is not None:
                cells.append(store_row(len(cells), method, seed, {"top1": v}, "digits"))
    grid = {"reference": {"kd": {"T->S": {"value": 82.0, "select": "best_test", "source": "KD paper"}}}}
    return RunData(run_dir, cells, {}, grid)


def groups_run(run_dir: Path) -> RunData:
    def metrics(a0: float, a1: float, extra: dict | None = None) -> dict:
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

    kd = {
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
        store_row(0, "ce", 0, metrics(50.0, 90.0), "spurious", False),
        store_row(1, "ce", 1, metrics(70.0, 90.0), "spurious", False),
        store_row(2, "kd", 0, metrics(60.0, 80.0, kd), "spurious"),
        store_row(3, "kd", 1, metrics(64.0, 82.0, kd), "spurious"),
    ]
    teachers = {"t0": {"id": "t0", "metrics": metrics(90.0, 90.0, {"scan/max": 0.3, "scan/mean": 0.1})}}
    return RunData(run_dir, cells, teachers, {})


def corruptions_run(run_dir: Path) -> RunData:
    def metrics(clean: float, acc: dict[tuple[str, int], float]) -> dict:
        m = {"top1": clean, **{f"c/{c}/{s}/top1": v for (c, s), v in acc.items()}}
        m["corruption_acc"] = sum(acc.values()) / len(acc)
        return m

    ce = {("fog", 1): 80.0, ("fog", 3): 60.0, ("snow", 1): 90.0, ("jpeg_compression", 1): 89.8}
    kd = {("fog", 1): 90.0, ("fog", 3): 80.0, ("snow", 1): 90.0, ("jpeg_compression", 1): 93.0}
    teacher = {f"c/{c}/{s}/teacher_top1": 96.0 - s for (c, s) in kd}
    cells = [
        store_row(0, "ce", 0, metrics(90.0, ce), "mnist5k"),
        store_row(1, "ce", 1, metrics(91.0, {k: v + 1 for k, v in ce.items()}), "mnist5k"),
        store_row(2, "kd", 0, {**metrics(95.0, kd), **teacher}, "mnist5k"),
        store_row(3, "kd", 1, {**metrics(94.0, kd), **teacher}, "mnist5k"),
    ]
    return RunData(run_dir, cells, {"t0": {"id": "t0", "metrics": {"top1": 99.0}}}, {})


#: case name -> (run builder, report options)
CASES: dict[str, tuple[Callable[[Path], RunData], dict]] = {
    "leaderboard": (leaderboard_run, {}),
    "leaderboard_baseline": (leaderboard_run, {"baseline": "ce"}),
    "leaderboard_best_val": (leaderboard_run, {"select": "best_val", "spread": "ci95"}),
    "leaderboard_ece_details": (leaderboard_run, {"metric": "ece", "details": True, "spread": "sem"}),
    "leaderboard_stats": (stats_run, {"baseline": "ce"}),
    "groups": (groups_run, {"kind": "groups"}),
    "groups_train": (groups_run, {"kind": "groups", "metric": "train/worst_group", "spread": "sem"}),
    "shift": (groups_run, {"kind": "shift"}),
    "corruptions": (corruptions_run, {"kind": "corruptions"}),
    "corruptions_baseline": (corruptions_run, {"kind": "corruptions", "baseline": "kd"}),
}


def render_case(name: str, fmt: str, run_dir: Path) -> str:
    build, options = CASES[name]
    args = ReportArgs(fmt=fmt, **options)
    args.check()
    return load(args.kind)(build(run_dir), args)


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
@pytest.mark.parametrize("name", list(CASES))
def test_report_output_matches_its_golden_file(name: str, fmt: str, tmp_path: Path):
    out = render_case(name, fmt, tmp_path)
    golden = GOLDEN / f"{name}.{fmt}"
    if os.environ.get("KDBENCH_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(out.encode())
    assert out == golden.read_bytes().decode()


def status_run(run_dir: Path) -> Path:
    """A run directory with a done, a failed, a running, a submitted and a pending cell, a
    teacher in the store and cached, and one cached that the store does not know."""
    from kdbench.rundir import RunDir
    from kdbench.store import Store

    rd = RunDir(run_dir)
    store = Store(run_dir / RunDir.STORE)
    ids = ["3fa91c07d2e84b6a", "a07c55e1b9d34f10", "5e21d0c9aa7f4b33", "b9d8e7f6a5c4d3e2", "7c6b5a4f3e2d1c0b"]
    for i, (cid, status) in enumerate(
        zip(ids, ("done", "failed", "pending", "pending", "pending"), strict=True)
    ):
        row = store_row(i, ("kd", "dkd", "fit_net")[i % 3], i % 2, {"top1": 80.0 + i}, "digits")
        cell = {**row["config"], "id": cid}
        error = (
            "Traceback (most recent call last):\nRuntimeError: CUDA out of memory"
            if status == "failed"
            else None
        )
        store.record(
            {"cell": cell, "status": status, "metrics": row["metrics"], "error": error, "attempt": 1 + i % 2}
        )
    store.record_teacher({"id": "t0d1e2f3a4b5c6", "label": "resnet32x4"}, {"top1": 95.125}, {}, 12.0)
    store.close()
    (run_dir / "teachers").mkdir()
    for tid in ("t0d1e2f3a4b5c6", "e9f8a7b6c5d4"):
        (run_dir / "teachers" / f"{tid}.pt").write_bytes(b"")
    rd.cell_dir(ids[2]).mkdir(parents=True)
    (rd.cell_dir(ids[2]) / "worker.json").write_text(json.dumps({"host": "node-17", "pid": 4242}))
    (run_dir / RunDir.JOBS).write_text(json.dumps({ids[3]: {"executor": "submitit", "job": "91823"}}))
    return run_dir


def test_status_output_matches_its_golden_file(tmp_path: Path):
    from kdbench.status import status_table

    out = status_table(status_run(tmp_path))
    golden = GOLDEN / "status.github"
    if os.environ.get("KDBENCH_UPDATE_GOLDEN"):
        golden.write_bytes(out.encode())
    assert out == golden.read_bytes().decode()


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
def test_status_is_a_report_kind_in_every_format(fmt: str, tmp_path: Path):
    from kdbench.report import report
    from kdbench.status import status_table

    run_dir = status_run(tmp_path)
    out = report(run_dir, kind="status", fmt=fmt)
    if fmt == "github":
        assert out == status_table(run_dir)
    elif fmt == "csv":
        lines = out.splitlines()
        assert lines[0] == "cell,method,pair,dataset,seed,state,where,attempts,error" and len(lines) == 6
        assert "a07c55e1b9,dkd,T→S,digits,1,failed,,2,RuntimeError: CUDA out of memory" in lines
    elif fmt == "json":
        cells, teachers = json.loads(out)
        assert cells["notes"] == ["1 done, 1 failed, 1 pending, 1 running, 1 submitted — 5 cells"]
        assert cells["rows"][3]["where"] == "submitit job 91823"
        assert [t["top1"]["mean"] for t in teachers["rows"]] == [None, 95.125]
    else:
        assert "% 1 done, 1 failed" in out and r"\toprule" in out


def test_status_keeps_ids_as_text_and_teacher_numbers_as_numbers(tmp_path: Path):
    """A cell id of digits stays as written; a teacher column of numbers only is aligned (and
    shortened) as tabulate does numbers, as ``kdbench status`` always showed it."""
    from kdbench.reports.render import render_report
    from kdbench.rundir import RunDir
    from kdbench.status import status_report

    rows = [{**store_row(0, "kd", 0, {}, "digits"), "id": "0012345678ab", "status": "pending"}]
    teachers = [{"id": "t0", "config": {"label": "T"}, "metrics": {"top1": 97.5}}]
    out = render_report(status_report(RunDir(tmp_path), rows, teachers), "github")
    assert "| 0012345678 |" in out
    assert out.splitlines()[-1] == "| t0        | T       | missing |   97.5 |"
