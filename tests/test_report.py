"""The leaderboard is computed from the store alone: mean ± std over seeds, best marked."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from kdbench.errors import KdbenchError
from kdbench.report import ReportArgs, build_board, open_run, render_board, report
from kdbench.store import Store


def cell(method: str, seed: int, dataset: str = "digits", teacher_id: str = "t1", uses_teacher: bool = True):
    return {
        "id": f"{method}-{dataset}-{seed}",
        "dataset": {"name": dataset},
        "teacher": {"id": teacher_id, "label": "big"},
        "student": {"label": "small"},
        "method": {"name": method, "label": method},
        "seed": seed,
        "train": {"epochs": 3},
        "uses_teacher": uses_teacher,
    }


@pytest.fixture
def run_dir(tmp_path):
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
                    "env": {"threads": 1, "torch": "2.5", "kernels": "cpp", "cuda": False},
                    "wall_s": 1.0,
                }
            )
    s.record({"cell": cell("fitnet", 0), "status": "failed", "error": "boom"})
    s.record_teacher({"id": "t1"}, {"top1": 97.5}, {}, 12.0)
    s.close()
    return tmp_path


def text(run_dir, fmt="github", **kw) -> str:
    args = ReportArgs(fmt=fmt, **kw)
    run = open_run(run_dir)
    return render_board(build_board(run, args), run, args)


def csv_rows(out: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(out)))


def test_board_mean_std_best_and_reference_rows(run_dir):
    board = build_board(open_run(run_dir), ReportArgs())
    assert board.rows[:2] == ["teacher", "ce"]
    col = board.columns[0]
    kd = board.stats["kd"][col]["top1"]
    assert kd.mean == pytest.approx(93.75) and kd.std == pytest.approx(statistics.stdev([93.0, 94.5]))
    assert board.best(col) == "dkd"  # 94.5 mean beats kd's 93.75; the teacher never counts
    assert board.failed == 1
    out = text(run_dir)
    assert "**94.50 ± 0.71 (2)**" in out
    assert "97.50 (1)" in out  # the teacher row: one number has no spread
    assert "1 cell(s) failed" in out
    assert next(ln for ln in out.splitlines() if ln.startswith("| fitnet")).split("|")[2].strip() == "failed"
    assert "top-1 (%) ↑" in out
    assert "selection: last epoch" in out and "seeds: 0, 1 (n = 2)" in out
    assert "cpu, 1 thread, torch 2.5, kernels cpp" in out


def test_latex_is_booktabs_with_bold_best_and_a_caption(run_dir):
    tex = text(run_dir, "latex")
    lines = tex.splitlines()
    assert lines[2].startswith(r"\begin{tabular}{l") and lines[3] == r"\toprule"
    assert r"\midrule" in lines and r"\bottomrule" in lines
    dkd = next(ln for ln in lines if ln.startswith("dkd"))
    assert r"\textbf{94.50 $\pm$ 0.71 (2)}" in dkd
    assert r"big$\rightarrow$small" in tex
    caption = next(ln for ln in lines if ln.startswith(r"\caption{"))
    assert "selection: last epoch" in caption and "seeds: 0, 1" in caption and "1 thread," in caption


def test_json_and_csv(run_dir):
    recs = json.loads(text(run_dir, "json"))
    by = {r["method"]: r for r in recs if r["status"] == "done"}
    assert by["dkd"]["best"] and not by["kd"]["best"]
    assert by["ce"]["metrics"]["top1"]["n"] == 2
    assert by["kd"]["protocol"]["select"] == "last" and by["kd"]["protocol"]["seeds"] == [0, 1]
    out = text(run_dir, "csv")
    assert out.splitlines()[0].startswith("method,column,metric,mean,std,n,best,status,")
    rows = csv_rows(out)
    dkd = next(r for r in rows if r["method"] == "dkd" and r["metric"] == "top1")
    assert dkd["best"] == "1" and dkd["status"] == "done"
    assert dkd["select"] == "last" and dkd["seeds"] == "0 1"


def test_failed_cells_have_a_status_and_error_in_csv_and_json(run_dir):
    recs = json.loads(text(run_dir, "json"))
    failed = [r for r in recs if r["status"] == "failed"]
    assert [(r["method"], r["error"], r["seed"]) for r in failed] == [("fitnet", "boom", 0)]
    fit = [r for r in csv_rows(text(run_dir, "csv")) if r["method"] == "fitnet"]
    assert len(fit) == 1 and fit[0]["status"] == "failed" and fit[0]["error"] == "boom"


def test_a_run_whose_cells_all_failed_still_lists_them(tmp_path):
    s = Store(tmp_path / "results.sqlite")
    for seed in (0, 1):
        s.record({"cell": cell("kd", seed), "status": "failed", "error": f"oom {seed}"})
    s.close()
    recs = json.loads(report(tmp_path, "json"))
    assert sorted(r["error"] for r in recs) == ["oom 0", "oom 1"]
    assert len(report(tmp_path, "csv").splitlines()) == 3


def test_ece_marks_the_lowest_in_every_format(run_dir):
    # ece: seed 0 -> 5.0, seed 1 -> 4.0 for every method; make kd clearly the lowest
    s = Store(run_dir / "results.sqlite")
    for seed in (0, 1):
        s.record(
            {
                "cell": cell("kd", seed),
                "status": "done",
                "metrics": {"top1": 80.0, "ece": 1.0 + seed, "wall_s": 1.0},
                "wall_s": 1.0,
            }
        )
    s.close()
    recs = {r["method"]: r for r in json.loads(text(run_dir, "json", metric="ece")) if r["status"] == "done"}
    assert recs["kd"]["best"] and not recs["dkd"]["best"]  # dkd has the best top-1, not the best ece
    assert recs["kd"]["metrics"]["ece"]["best"] and recs["dkd"]["metrics"]["top1"]["best"]
    rows = csv_rows(text(run_dir, "csv", metric="ece"))
    best_ece = [r["method"] for r in rows if r["metric"] == "ece" and r["best"] == "1"]
    assert best_ece == ["kd"]
    md = text(run_dir, metric="ece")
    assert "**1.50 ± 0.71 (2)**" in md and "ECE (%) ↓" in md and "lower is better" in md
    assert r"\textbf{1.50 $\pm$ 0.71 (2)}" in text(run_dir, "latex", metric="ece")


def test_unknown_metric_exits_2_naming_those_that_exist(run_dir):
    with pytest.raises(KdbenchError, match="unknown metric 'top7'; this run has: ece, top1, wall_s") as e:
        report(run_dir, metric="top7")
    assert e.value.exit_code == 2
    with pytest.raises(KdbenchError, match="no cell of this run recorded metric 'top5'"):
        report(run_dir, metric="top5")


def test_an_undeclared_metric_is_refused_even_when_every_cell_failed(tmp_path):
    s = Store(tmp_path / "results.sqlite")
    s.record({"cell": cell("kd", 0), "status": "failed", "error": "oom"})
    s.close()
    with pytest.raises(KdbenchError, match="unknown metric 'top7'; no cell of this run finished") as e:
        report(tmp_path, metric="top7")
    assert e.value.exit_code == 2 and "declared metrics: top1, top5, nll" in str(e.value)
    assert "failed" in report(tmp_path, metric="top5")  # declared: the failures are the table


def test_report_needs_a_store(tmp_path):
    with pytest.raises(KdbenchError, match="kdbench run"):
        report(tmp_path)


def test_report_shows_only_the_grid_last_run(run_dir):
    # an earlier version of the grid left a cell with the same row/column names
    s = Store(run_dir / "results.sqlite")
    old = cell("kd", 0)
    old["id"] = "kd-old-config"
    s.record({"cell": old, "status": "done", "metrics": {"top1": 10.0}, "wall_s": 1.0})
    current = [c["id"] for c in s.cells() if c["id"] != "kd-old-config"]
    s.close()
    (run_dir / "cells.json").write_text(json.dumps(current))
    assert "93.75 ± 1.06 (2)" in report(run_dir)  # kd over its two current seeds only
    assert "(3)" in report(run_dir, everything=True)


def test_spread_kinds(run_dir):
    sem = 1.5 / 2**0.5 / 2**0.5  # kd: std of [93, 94.5] is 1.5/sqrt(2); sem divides by sqrt(n)
    assert f"93.75 ± {sem:.2f} (2)" in report(run_dir, spread="sem")
    assert f"93.75 ± {sem * 12.706:.2f} (2)" in report(run_dir, spread="ci95")
    assert "mean ± 95% CI half-width (t)" in report(run_dir, spread="ci95")
    with pytest.raises(KdbenchError, match="--spread"):
        report(run_dir, spread="iqr")


def test_a_store_of_another_cell_format_is_refused(run_dir):
    s = Store(run_dir / "results.sqlite")
    future = {**cell("kd", 7), "format": 99}
    s.record({"cell": future, "status": "done", "metrics": {"top1": 1.0}, "wall_s": 1.0})
    s.close()
    with pytest.raises(KdbenchError, match="cell format 99") as e:
        report(run_dir)
    assert e.value.exit_code == 2


def test_two_entries_of_one_dataset_get_their_own_columns():
    from kdbench.reports.leaderboard import column_label, dataset_labels

    def cfg(strength):
        return {
            "dataset": {"name": "spurious", "params": {"base": "mnist5k", "strength": strength}},
            "teacher": {"label": "t"},
            "student": {"label": "s"},
        }

    a, b = cfg(0.9), cfg(0.99)
    labels = dataset_labels([a, b])
    assert column_label(a, labels) == "spurious(strength=0.9): t→s"
    assert column_label(b, labels) == "spurious(strength=0.99): t→s"
    assert column_label(a, dataset_labels([a])) == "spurious: t→s"  # one entry: just its name
