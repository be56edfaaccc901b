"""The leaderboard is computed from the store alone: mean ± std over seeds, best marked."""

from __future__ import annotations

import json
import statistics

import pytest

from kdbench.errors import KdbenchError
from kdbench.report import build_board, render, report
from kdbench.store import Store


def cell(method: str, seed: int, dataset: str = "digits", teacher_id: str = "t1", uses_teacher: bool = True):
    return {
        "id": f"{method}-{dataset}-{seed}",
        "dataset": {"name": dataset},
        "teacher": {"id": teacher_id, "label": "big"},
        "student": {"label": "small"},
        "method": {"name": method, "label": method},
        "seed": seed,
        "uses_teacher": uses_teacher,
    }


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "results.sqlite")
    acc = {"ce": [90.0, 92.0], "kd": [93.0, 94.5], "dkd": [95.0, 94.0]}
    for method, values in acc.items():
        for seed, v in enumerate(values):
            c = cell(method, seed, uses_teacher=method != "ce")
            s.record(
                {
                    "cell": c,
                    "status": "done",
                    "metrics": {"top1": v, "ece": 5.0 - seed, "wall_s": 1.0},
                    "wall_s": 1.0,
                }
            )
    s.record({"cell": cell("fitnet", 0), "status": "failed", "error": "boom"})
    s.record_teacher({"id": "t1"}, {"top1": 97.5}, {}, 12.0)
    yield s
    s.close()


def test_board_mean_std_best_and_reference_rows(store):
    board = build_board(store)
    assert board.rows[:2] == ["teacher", "ce"]
    col = board.columns[0]
    kd = board.stats["kd"][col]["top1"]
    assert kd.mean == pytest.approx(93.75) and kd.std == pytest.approx(statistics.stdev([93.0, 94.5]))
    assert board.best(col) == "dkd"  # 94.5 mean beats kd's 93.75; the teacher never counts
    assert board.best(col, "ece") in ("ce", "kd", "dkd")
    assert board.failed == 1
    text = render(board)
    assert "**94.50 ± 0.71 (2)**" in text
    assert "97.50 ± 0.00 (1)" in text  # the teacher row
    assert "1 cell(s) failed" in text


def test_latex_is_booktabs_with_bold_best(store):
    tex = render(build_board(store), "latex")
    lines = tex.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{l") and lines[1] == r"\toprule"
    assert r"\midrule" in lines and lines[-2] == r"\bottomrule"
    dkd = next(ln for ln in lines if ln.startswith("dkd"))
    assert r"\textbf{94.50 $\pm$ 0.71 (2)}" in dkd
    assert r"big$\rightarrow$small" in tex


def test_json_and_csv(store):
    recs = json.loads(render(build_board(store), "json"))
    by = {r["method"]: r for r in recs}
    assert by["dkd"]["best"] and not by["kd"]["best"]
    assert by["ce"]["metrics"]["top1"]["n"] == 2
    csv = render(build_board(store), "csv").splitlines()
    assert csv[0] == "method,column,metric,mean,std,n,best"
    assert any(line.startswith("dkd,") and line.endswith(",1") for line in csv)


def test_report_needs_a_store(tmp_path):
    with pytest.raises(KdbenchError, match="kdbench run"):
        report(tmp_path)


def test_report_shows_only_the_grid_last_run(store, tmp_path):
    # an earlier version of the grid left a cell with the same row/column names
    old = cell("kd", 0)
    old["id"] = "kd-old-config"
    store.record({"cell": old, "status": "done", "metrics": {"top1": 10.0}, "wall_s": 1.0})
    current = [c["id"] for c in store.cells() if c["id"] != "kd-old-config"]
    (tmp_path / "cells.json").write_text(json.dumps(current))
    text = report(tmp_path)
    assert "93.75 ± 1.06 (2)" in text  # kd over its two current seeds only
    assert "(3)" in report(tmp_path, everything=True)
