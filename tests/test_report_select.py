"""Selection rules, significance, published numbers and metric declarations, on a fabricated run."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.metric_defs import metric_info, register_metric, split_metric
from kdbench.report import report
from kdbench.reports import OPTIMISTIC, _normalise_row, spread
from kdbench.reports.leaderboard import Stat, compare
from kdbench.store import Store

ENV = {"threads": 2, "torch": "2.5.1", "kernels": "cpp", "cuda": False}


def cell(method: str, seed: int, epochs: int = 4) -> dict:
    return {
        "id": f"{method}-{seed}",
        "dataset": {"name": "digits"},
        "teacher": {"id": "t1", "label": "big"},
        "student": {"label": "small"},
        "method": {"name": method, "label": method},
        "seed": seed,
        "train": {"epochs": epochs},
        "uses_teacher": method != "ce",
    }


def add(run_dir: Path, method: str, seed: int, epochs: list[dict] | None, final: dict | None = None) -> None:
    """A done cell whose final metrics are its last epoch's test values (or ``final``)."""
    s = Store(run_dir / "results.sqlite")
    if final is None:
        final = {k[len("test/") :]: v for k, v in epochs[-1].items() if k.startswith("test/")}
    s.record(
        {
            "cell": cell(method, seed, len(epochs or [1])),
            "status": "done",
            "metrics": {**final, "wall_s": 3.0},
            "env": ENV,
            "wall_s": 3.0,
        }
    )
    s.close()
    if epochs is not None:
        d = run_dir / "cells" / f"{method}-{seed}"
        d.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"stage": "init", "epoch": 0, "loss_ce": 1.0})]  # other stages are ignored
        lines += [json.dumps({"stage": "train", "epoch": e, **row}) for e, row in enumerate(epochs)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def curve(test: list[float], val: list[float], **extra: list[float]) -> list[dict]:
    rows = []
    for e, (t, v) in enumerate(zip(test, val, strict=True)):
        row = {"test/top1": t, "val/top1": v, "test/nll": 1 - t / 100, "val/nll": 1 - v / 100, "eval_s": 0.05}
        row.update({k.replace("__", "/"): vs[e] for k, vs in extra.items()})
        rows.append(row)
    return rows


@pytest.fixture
def run_dir(tmp_path):
    # validation peaks at epoch 2 (index 1), test at epoch 3 (index 2), last is epoch 4
    for seed in range(3):
        add(tmp_path, "ce", seed, curve([80, 84, 88 + seed, 86], [81, 90, 85, 84]))
        add(tmp_path, "kd", seed, curve([82, 85 + seed, 90, 87], [82, 91, 86, 85]))
    return tmp_path


def csv_rows(out: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(out)))


def records(run_dir: Path, **kw) -> dict[str, dict]:
    return {r["method"]: r for r in json.loads(report(run_dir, "json", **kw)) if r["status"] == "done"}


# ---------------------------------------------------------------- selection rules


def test_last_is_the_final_model(run_dir):
    recs = records(run_dir)
    assert recs["kd"]["metrics"]["top1"]["values"] == [87.0, 87.0, 87.0]
    assert recs["kd"]["protocol"]["select"] == "last" and not recs["kd"]["protocol"]["optimistic"]


def test_best_val_picks_the_epoch_the_validation_curve_says(run_dir):
    recs = records(run_dir, select="best_val")
    # epoch 2 has the best val/top1 (91); its test values are 85, 86, 87 over the seeds
    assert recs["kd"]["metrics"]["top1"]["values"] == [85.0, 86.0, 87.0]
    assert recs["ce"]["metrics"]["top1"]["values"] == [84.0, 84.0, 84.0]
    assert recs["kd"]["metrics"]["wall_s"]["values"] == [3.0] * 3  # whole-cell cost carried over
    assert recs["kd"]["protocol"]["selected_epochs"] == [2] * 6
    md = report(run_dir, select="best_val")
    assert "selection: epoch with the best validation top1" in md and "selected epochs 2" in md
    assert "per-epoch evaluation: 0.20 s per cell (mean)" in md
    assert OPTIMISTIC not in md
    rows = csv_rows(report(run_dir, "csv", select="best_val"))
    assert {r["select"] for r in rows} == {"best_val"} and {r["optimistic"] for r in rows} == {"0"}


def test_best_val_follows_the_metric_direction(run_dir):
    # nll is lower-is-better: val/nll is lowest where val/top1 is highest (epoch 2)
    recs = records(run_dir, select="best_val", metric="nll")
    assert recs["kd"]["metrics"]["nll"]["values"] == pytest.approx([0.15, 0.14, 0.13])


def test_best_val_of_worst_group_selects_on_validation_worst_group(tmp_path):
    for seed in range(2):
        rows = curve(
            [80, 85, 90],
            [80, 85, 90],
            test__worst_group=[50.0, 70.0, 60.0],
            val__worst_group=[40.0, 75.0, 65.0],
        )
        add(tmp_path, "kd", seed, rows)
    recs = records(tmp_path, select="best_val", metric="worst_group")
    assert recs["kd"]["metrics"]["worst_group"]["values"] == [70.0, 70.0]  # epoch 2, not the best top-1 epoch
    assert recs["kd"]["metrics"]["top1"]["values"] == [85.0, 85.0]


def test_best_test_is_labelled_optimistic_in_every_format(run_dir):
    md = report(run_dir, select="best_test")
    assert OPTIMISTIC in md and "90.00 ± 0.00 (3)" in md  # kd's best test epoch
    tex = report(run_dir, "latex", select="best_test")
    caption = next(ln for ln in tex.splitlines() if ln.startswith(r"\caption{"))
    assert OPTIMISTIC in caption
    rows = csv_rows(report(run_dir, "csv", select="best_test"))
    assert rows and all(r["optimistic"] == "1" and r["select"] == "best_test" for r in rows)
    for rec in json.loads(report(run_dir, "json", select="best_test")):
        assert rec["protocol"]["optimistic"] is True and OPTIMISTIC in rec["protocol"]["selection"]


def test_best_val_without_a_validation_split_is_a_clear_error(tmp_path):
    rows = [{"test/top1": 80.0}, {"test/top1": 82.0}]  # eval.every without val_fraction
    add(tmp_path, "kd", 0, rows)
    with pytest.raises(KdbenchError, match=r"val/top1.*val_fraction") as e:
        report(tmp_path, select="best_val")
    assert e.value.exit_code == 2
    assert "82.00 (1)" in report(tmp_path, select="best_test")


def test_best_test_without_per_epoch_rows_is_a_clear_error(tmp_path):
    add(tmp_path, "kd", 0, None, final={"top1": 80.0})
    with pytest.raises(KdbenchError, match=r"--select best_test needs per-epoch test/top1.*every"):
        report(tmp_path, select="best_test")


def test_rows_of_older_runs_are_read(tmp_path):
    rows = [{"test_top1": 70.0, "test_nll": 1.0}, {"test_top1": 75.0, "test_nll": 0.9}, {"test_top1": 72.0}]
    add(tmp_path, "kd", 0, None, final={"top1": 72.0})
    d = tmp_path / "cells" / "kd-0"
    d.mkdir(parents=True)
    text = "\n".join(json.dumps({"stage": "train", "epoch": e, **r}) for e, r in enumerate(rows))
    (d / "metrics.jsonl").write_text(text + '\n{"stage": "train", "ep')  # a line cut by a crash
    assert "75.00 (1)" in report(tmp_path, select="best_test")
    # seam names with an underscore in the set stay as they are
    assert _normalise_row({"test_reversed/top1": 1.0, "val_top1": 2.0}) == {
        "test_reversed/top1": 1.0,
        "val/top1": 2.0,
    }


def test_protocol_names_epochs_seeds_and_hardware(run_dir):
    md = report(run_dir)
    assert "epochs: 4" in md and "seeds: 0, 1, 2 (n = 3)" in md
    assert "hardware: cpu, 2 threads, torch 2.5.1, kernels cpp" in md
    rec = records(run_dir)["kd"]["protocol"]
    assert (
        rec["epochs"] == [4]
        and rec["seeds"] == [0, 1, 2]
        and rec["hardware"] == ["cpu, 2 threads, torch 2.5.1, kernels cpp"]
    )


# ---------------------------------------------------------------- significance


def three_methods(run_dir: Path, n: int, kd_seeds: list[int] | None = None) -> None:
    """ce clearly below kd; dkd identical to kd seed by seed."""
    noise = [0.3, -0.2, 0.1, -0.4, 0.25]
    for seed in range(n):
        add(run_dir, "ce", seed, None, final={"top1": 80.0 + noise[seed]})
    for seed in kd_seeds if kd_seeds is not None else range(n):
        add(run_dir, "kd", seed, None, final={"top1": 90.0 + noise[seed] * 0.5})
        add(run_dir, "dkd", seed, None, final={"top1": 90.0 + noise[seed] * 0.5})


def test_clear_difference_is_not_marked_and_identical_rows_are(tmp_path):
    three_methods(tmp_path, 3)
    md = report(tmp_path, baseline="kd")
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("|")}
    assert "≈" in lines["dkd"] and "≈" not in lines["ce"] and "≈" not in lines["kd (baseline)"]
    assert "≈: difference from kd not significant" in md and "paired t-test" in md
    recs = records(tmp_path, baseline="kd")
    assert recs["ce"]["significance"]["significant"] is True and recs["ce"]["significance"]["p"] < 0.01
    assert recs["dkd"]["significance"]["significant"] is False
    assert recs["kd"]["is_baseline"] and recs["kd"]["significance"] is None
    rows = {r["method"]: r for r in csv_rows(report(tmp_path, "csv", baseline="kd")) if r["metric"] == "top1"}
    assert rows["dkd"]["not_significant"] == "1" and rows["ce"]["not_significant"] == "0"
    assert rows["ce"]["test"] == "paired t-test"
    tex = report(tmp_path, "latex", baseline="kd")
    assert r"$\approx$" in next(ln for ln in tex.splitlines() if ln.startswith("dkd"))


def test_fewer_than_three_seeds_marks_nothing(tmp_path):
    three_methods(tmp_path, 2)
    md = report(tmp_path, baseline="kd")
    assert "n too small" in md and "| ≈" not in md and "** ≈" not in md
    assert not any(ln.rstrip(" |").endswith("≈") for ln in md.splitlines() if ln.startswith("|"))
    recs = records(tmp_path, baseline="kd")
    assert recs["dkd"]["significance"] == {
        "test": "n too small",
        "p": None,
        "diff": None,
        "significant": None,
        "alpha": 0.05,
    }


def test_a_missing_seed_pairs_on_the_seeds_both_share(tmp_path):
    three_methods(tmp_path, 5, kd_seeds=[2, 3, 4])  # ce has seeds 0-4, kd only 2-4
    recs = records(tmp_path, baseline="kd")
    assert recs["ce"]["significance"]["test"] == "paired t-test"  # was Welch's t-test
    assert recs["ce"]["significance"]["n"] == 3
    assert recs["ce"]["significance"]["significant"] is True


def test_disjoint_seeds_use_welch(tmp_path):
    three_methods(tmp_path, 5, kd_seeds=[])
    for seed in (5, 6, 7):
        add(tmp_path, "kd", seed, None, final={"top1": 90.0 + seed / 10})
    recs = records(tmp_path, baseline="kd")
    assert recs["ce"]["significance"]["test"] == "Welch's t-test"
    assert "Welch's t-test" in report(tmp_path, baseline="kd")


def test_holm_bonferroni_across_the_table(tmp_path):
    ce = [80.0, 80.6, 79.5, 80.2, 79.9]
    others = {"kd": [82.1, 82.4, 81.7, 81.9, 82.6], "fitnet": [80.4, 80.9, 79.9, 80.3, 80.6]}
    others.update(rkd=[80.3, 80.9, 79.4, 80.6, 80.2], dkd=ce)
    for seed, v in enumerate(ce):
        add(tmp_path, "ce", seed, None, final={"top1": v})
        for m, vs in others.items():
            add(tmp_path, m, seed, None, final={"top1": vs[seed]})
    recs = records(tmp_path, baseline="ce")
    fit = recs["fitnet"]["significance"]
    assert fit["p"] < 0.05 and fit["significant"] is False  # p = 0.017 alone; Holm: 2nd of 4 -> 0.052
    assert fit["p_adjusted"] == pytest.approx(3 * fit["p"]) and fit["comparisons"] == 4
    assert recs["kd"]["significance"]["significant"] is True
    md = report(tmp_path, baseline="ce")
    assert "≈" in next(ln for ln in md.splitlines() if ln.startswith("| fitnet"))
    assert "after Holm–Bonferroni over the 4 comparison(s) of this table" in md


def test_a_constant_difference_with_no_variance_is_undefined_not_significant(tmp_path):
    for seed, v in enumerate([80.0, 80.6, 79.5]):
        add(tmp_path, "ce", seed, None, final={"top1": v})
        add(tmp_path, "kd", seed, None, final={"top1": v + 0.5})
        add(tmp_path, "dkd", seed, None, final={"top1": v})
    recs = records(tmp_path, baseline="ce")
    assert recs["kd"]["significance"]["p"] is None and recs["kd"]["significance"]["undefined"] is True
    assert recs["kd"]["significance"]["significant"] is None  # was p = 0, "significant"
    assert recs["dkd"]["significance"]["p"] == 1.0 and recs["dkd"]["significance"]["significant"] is False
    md = report(tmp_path, baseline="ce")
    assert next(ln for ln in md.splitlines() if ln.startswith("| kd")).rstrip(" |").endswith("†")
    assert "†: the same non-zero difference from ce on every seed (zero variance)" in md


def test_unknown_baseline(tmp_path):
    three_methods(tmp_path, 3)
    with pytest.raises(KdbenchError, match="'crd' is not a method of this run; choose one of ce, kd"):
        report(tmp_path, baseline="crd")


def test_compare_directly():
    a = Stat([1.0, 2.0, 3.0], [0, 1, 2])
    assert compare(a, Stat([1.0, 2.0, 3.0], [0, 1, 2])).significant is False
    shifted = compare(a, Stat([11.0, 12.0, 13.0], [0, 1, 2]))  # constant difference, zero variance
    assert shifted.undefined and shifted.p is None and shifted.significant is None
    assert compare(a, Stat([1.0, 2.0], [0, 1])).test == "n too small"


def test_ci95_uses_student_t():
    assert spread([1.0, 2.0, 3.0], "ci95") == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert spread([1.0], "std") != spread([1.0], "std")  # nan: one seed has no spread


# ---------------------------------------------------------------- published numbers


def test_reference_adds_a_paper_column_with_the_difference(tmp_path):
    three_methods(tmp_path, 3)
    (tmp_path / "grid.yaml").write_text(
        "name: x\n"
        "reference:\n"
        "  kd:\n"
        "    source: mdistiller README, CIFAR-100\n"
        "    big->small: 91.0\n"
        "  dkd: {'digits: big→small': {value: 89.5, source: DKD paper table 2}}\n"
        "  ce: {big->small: {value: 2.0, metric: ece}}\n"  # another metric: not shown for top1
    )
    md = report(tmp_path)
    head = md.splitlines()[0]
    assert "paper (Δ)" in head
    kd = next(ln for ln in md.splitlines() if ln.startswith("| kd"))
    assert "91.00 [1] (−0.97)" in kd  # kd mean 90.03
    dkd = next(ln for ln in md.splitlines() if ln.startswith("| dkd"))
    assert "89.50 [2] (+0.53)" in dkd
    assert "[1] mdistiller README, CIFAR-100; [2] DKD paper table 2" in md
    recs = records(tmp_path)
    assert recs["kd"]["paper"]["value"] == 91.0 and recs["kd"]["paper"]["diff"] == pytest.approx(0.1 / 3 - 1)
    assert recs["ce"]["paper"] is None
    rows = {r["method"]: r for r in csv_rows(report(tmp_path, "csv")) if r["metric"] == "top1"}
    assert rows["dkd"]["paper"] == "89.5" and rows["dkd"]["paper_source"] == "DKD paper table 2"
    assert r"paper ($\Delta$)" in report(tmp_path, "latex")


def test_a_paper_selected_by_another_rule_is_marked(tmp_path):
    three_methods(tmp_path, 3)
    (tmp_path / "grid.yaml").write_text(
        "name: x\nreference:\n  kd: {big->small: {value: 91.0, select: best_test}}\n"
        "  dkd: {select: last, big->small: 89.5}\n"
    )
    md = report(tmp_path)
    assert "91.00 (−0.97) ≠" in next(ln for ln in md.splitlines() if ln.startswith("| kd"))
    assert "≠" not in next(ln for ln in md.splitlines() if ln.startswith("| dkd"))
    assert "≠: the paper selected its number by best_test, this table by last" in md
    assert records(tmp_path)["kd"]["paper"]["same_select"] is False
    bad = "name: x\nreference: {kd: {big->small: {value: 91.0, select: best}}}\n"
    (tmp_path / "grid.yaml").write_text(bad)
    with pytest.raises(KdbenchError, match="select 'best' is not a selection rule; use one of last"):
        report(tmp_path)


def test_bad_reference_names_the_key(tmp_path):
    three_methods(tmp_path, 3)
    (tmp_path / "grid.yaml").write_text("name: x\nreference: {kd: {big->small: seventy}}\n")
    with pytest.raises(KdbenchError, match=r"reference.kd.big->small: expected a number"):
        report(tmp_path)


def test_reference_does_not_change_cell_ids(tmp_path):
    from kdbench.config import load_grid
    from kdbench.grid import expand
    from tests.conftest import TINY_GRID

    body = TINY_GRID.format(out=tmp_path, methods="[kd]", seeds="[0]", epochs=1)
    (tmp_path / "a.yaml").write_text(body)
    (tmp_path / "b.yaml").write_text(body + "reference: {kd: {'smallcnn->smallcnn': 70.66}}\n")
    fps = [{"sha": "x"}]
    a, b = (expand(load_grid(tmp_path / f), fps, [{}]) for f in ("a.yaml", "b.yaml"))
    assert [c.id for c in a] == [c.id for c in b]


# ---------------------------------------------------------------- metric declarations


def test_metric_declarations_resolve_prefixed_names():
    assert metric_info("top1").higher_is_better and metric_info("top1").arrow == "↑"
    assert not metric_info("ece").higher_is_better and metric_info("nll").arrow == "↓"
    assert metric_info("val/top1") is metric_info("top1")
    assert metric_info("c/fog/3/top1") is metric_info("top1")
    assert metric_info("group/landbird_water/acc").family == "groups"
    assert metric_info("val/group/landbird_water/acc").family == "groups"
    assert metric_info("top7") is None
    assert split_metric("c/fog/3/top1") == ("c/fog/3", "top1")
    assert split_metric("test_reversed/worst_group") == ("test_reversed", "worst_group")
    assert split_metric("worst_group") == ("test", "worst_group")
    register_metric("my_score", False, "my score", family="plugin")
    assert metric_info("val/my_score").arrow == "↓"


def test_unknown_metric_via_the_cli_exits_2(run_dir):
    from tests.conftest import kdbench_cli

    r = kdbench_cli("report", str(run_dir), "--metric", "top7")
    assert r.returncode == 2 and "unknown metric 'top7'" in r.stderr and "top1" in r.stderr
    r = kdbench_cli("report", str(run_dir), "--select", "best_val", "--baseline", "kd", "--spread", "sem")
    assert r.returncode == 0, r.stderr
    assert "selection: epoch with the best validation top1" in r.stdout and "standard error" in r.stdout


def test_unknown_metric_lists_corruption_and_group_metrics_briefly(tmp_path):
    final = {"top1": 90.0, "c/fog/1/top1": 80.0, "c/fog/2/top1": 70.0, "c/snow/1/top1": 75.0}
    final.update({f"group/g{i}/acc": 50.0 + i for i in range(4)})
    add(tmp_path, "kd", 0, None, final=final)
    with pytest.raises(KdbenchError) as e:
        report(tmp_path, metric="top7")
    assert "this run has: c/*/*/top1, group/*/acc, top1, wall_s" in str(e.value)


def test_report_kinds_dispatch(run_dir, monkeypatch):
    import kdbench.reports as reports

    with pytest.raises(KdbenchError, match="unknown --kind 'pie'; choose one of leaderboard, groups"):
        report(run_dir, kind="pie")
    monkeypatch.setitem(reports.KINDS, "groups", "kdbench.reports.no_such_module")
    with pytest.raises(KdbenchError, match="report kind 'groups' is not available"):
        report(run_dir, kind="groups")
    monkeypatch.setitem(reports.KINDS, "groups", "kdbench.reports.leaderboard")
    assert report(run_dir, kind="groups") == report(run_dir)


def test_dfr_values_become_a_row_of_their_own(tmp_path):
    for seed in range(2):
        final = {"top1": 90.0, "worst_group": 40.0 + seed, "dfr/top1": 88.0, "dfr/worst_group": 70.0 + seed}
        add(tmp_path, "kd", seed, None, final=final)
    recs = records(tmp_path, metric="worst_group")
    assert recs["kd"]["metrics"]["worst_group"]["mean"] == 40.5 and "dfr/top1" not in recs["kd"]["metrics"]
    assert recs["kd+dfr"]["metrics"]["worst_group"]["mean"] == 70.5 and recs["kd+dfr"]["best"]
    assert "| kd+dfr" in report(tmp_path, metric="worst_group")
