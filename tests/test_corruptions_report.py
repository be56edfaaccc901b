"""``--kind corruptions``: per-corruption table, mCE / relative mCE, plot; leaderboard on corruption_acc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.reports import ReportArgs, RunData, leaderboard, load
from kdbench.reports import corruptions as report
from tests.conftest import store_row


def _metrics(clean: float, acc: dict[tuple[str, int], float]) -> dict:
    m = {"top1": clean}
    m.update({f"c/{c}/{s}/top1": v for (c, s), v in acc.items()})
    m.update({f"c/{c}/{s}/nll": 1.0 for (c, s) in acc})
    vals = list(acc.values())
    m["corruption_acc"] = sum(vals) / len(vals)
    m["corruption_rel_drop"] = 100 * (clean - m["corruption_acc"]) / clean
    return m


def _cell(i: int, method: str, seed: int, metrics: dict) -> dict:
    return store_row(i, method, seed, metrics, "mnist5k")


# ce: errors 20/40 (fog), 10/30 (snow), clean error 10; kd: errors 10/20, 10/10, clean error 5
CE = {("fog", 1): 80.0, ("fog", 3): 60.0, ("snow", 1): 90.0, ("snow", 3): 70.0}
KD = {("fog", 1): 90.0, ("fog", 3): 80.0, ("snow", 1): 90.0, ("snow", 3): 90.0}
# the teacher's accuracy on each set, recorded by the cells that use it
TEACHER = {f"c/{c}/{s}/teacher_top1": 96.0 - s for (c, s) in KD}


@pytest.fixture
def run(tmp_path: Path) -> RunData:
    cells = [
        _cell(0, "ce", 0, _metrics(90.0, CE)),
        _cell(1, "ce", 1, _metrics(90.0, CE)),
        _cell(2, "kd", 0, {**_metrics(95.0, KD), **TEACHER}),
        _cell(3, "kd", 1, {**_metrics(95.0, KD), **TEACHER}),
    ]
    return RunData(tmp_path, cells, {"t0": {"id": "t0", "metrics": {"top1": 99.0}}}, {})


def test_table_numbers(run):
    t = report.table(leaderboard.build_board(run, ReportArgs(kind="corruptions")), "mnist5k: T→S", "ce")
    assert t["corruptions"] == ["snow", "fog"]  # CIFAR-10-C order
    assert t["severities"] == [1, 3]
    rows = {x["method"]: x for x in t["rows"]}
    assert t["rows"][0]["method"] == "teacher"
    teacher = rows["teacher"]
    assert teacher["clean"] == 99.0 and teacher["corruption_acc"] == 94.0
    assert teacher["by_severity"] == {1: 95.0, 3: 93.0}
    ce, kd = rows["ce"], rows["kd"]
    assert ce["per_corruption"] == {"snow": 80.0, "fog": 70.0}
    assert ce["corruption_acc"] == 75.0 and ce["rel_drop"] == pytest.approx(100 * 15 / 90)
    assert ce["mCE"] == pytest.approx(100.0) and ce["rel_mCE"] == pytest.approx(100.0)
    # kd: CE_fog = 30/60, CE_snow = 20/40 -> mCE 50; rel: fog (30-10)/(60-20)=0.5, snow (20-10)/(40-20)=0.5
    assert kd["mCE"] == pytest.approx(50.0) and kd["rel_mCE"] == pytest.approx(50.0)
    assert kd["by_severity"] == {1: 90.0, 3: 85.0}


def test_render_formats_and_plot(run, tmp_path):
    out = load("corruptions")(run, ReportArgs(kind="corruptions"))
    assert "| method" in out and "mCE (ce=100)" in out and "| kd " in out
    assert "snow" in out and "fog" in out and "RobustBench" in out
    data = json.loads(load("corruptions")(run, ReportArgs(kind="corruptions", fmt="json", baseline="kd")))
    kd = next(r for r in data[0]["rows"] if r["method"] == "kd")
    assert data[0]["baseline"] == "kd" and kd["mCE"] == pytest.approx(100.0) and kd["acc"]["fog/3"] == 80.0
    csv = load("corruptions")(run, ReportArgs(kind="corruptions", fmt="csv"))
    assert "mnist5k: T→S,ce,fog,3,60" in csv
    png = tmp_path / "sev.png"
    load("corruptions")(run, ReportArgs(kind="corruptions", plot=str(png)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_metrics_and_baseline_are_explained(run, tmp_path):
    with pytest.raises(KdbenchError, match="--baseline 'dkd' is not a"):
        load("corruptions")(run, ReportArgs(kind="corruptions", baseline="dkd"))
    bare = RunData(tmp_path, [_cell(0, "ce", 0, {"top1": 90.0})], {}, {})
    with pytest.raises(KdbenchError, match="corruptions: all"):
        load("corruptions")(bare, ReportArgs(kind="corruptions"))


def test_corruption_acc_leaderboard(run):
    out = load("leaderboard")(run, ReportArgs(metric="corruption_acc"))
    assert "75.00" in out and "87.50" in out and "corruption acc (%) ↑" in out


def test_relative_mce_skips_corruptions_the_baseline_does_not_feel(tmp_path):
    ce = {**CE, ("jpeg_compression", 1): 90.0, ("jpeg_compression", 3): 89.5}  # loses 0.25 points
    kd = {**KD, ("jpeg_compression", 1): 95.0, ("jpeg_compression", 3): 80.0}
    cells = [_cell(0, "ce", 0, _metrics(90.0, ce)), _cell(1, "kd", 0, _metrics(95.0, kd))]
    run = RunData(tmp_path, cells, {}, {})
    t = report.table(leaderboard.build_board(run, ReportArgs(kind="corruptions")), "mnist5k: T→S", "ce")
    assert t["rel_corruptions"] == ["snow", "fog"]
    kd_row = next(x for x in t["rows"] if x["method"] == "kd")
    assert kd_row["rel_mCE"] == pytest.approx(50.0)  # jpeg's ((5-5)+(20-5))/(0+0.5)=30 is left out
    assert kd_row["mCE"] == pytest.approx(100 * (0.5 + 0.5 + 25 / 20.5) / 3)  # errors 5+20 vs 10+10.5
    out = load("corruptions")(run, ReportArgs(kind="corruptions"))
    assert "rel. mCE over 2 of 3 corruptions; jpeg cost 'ce' under 1 point" in out


def test_latex_output_compiles_as_is_titles_and_notes_are_comments(run):
    latex = load("corruptions")(run, ReportArgs(kind="corruptions", fmt="latex"))
    prose = [ln for ln in latex.splitlines() if ln and not ln.startswith(("\\", " ", "%"))]
    assert prose == []  # before: the title and every note were bare text, "&" in a note included
    assert "% - mCE / rel. mCE (Hendrycks & Dietterich 2019)" in latex
