"""Teacher sharing (lockstep groups): the same numbers as cells run one by one, on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdbench.config import load_grid
from kdbench.engine.cell import run_cell
from kdbench.engine.lockstep import SharedTeachers, balance_groups, group_key, plan_groups, run_group
from kdbench.engine.train import StopRequested, Trainer, clear_stop, request_stop
from kdbench.features import TapSpec
from kdbench.runner import plan


def _cells(tiny_grid, methods: str, epochs: int = 2):
    """The tiny grid's cells; with consistency, train.views gains the ``strong`` view it trains on."""
    grid = tiny_grid(methods=methods, epochs=epochs)
    if "consistency" in methods:
        views = "views: {strong: randaugment}}"
        grid.write_text(
            grid.read_text().replace("schedule: cosine, views: {}}", "schedule: cosine, " + views, 1)
        )
    return plan(load_grid(grid)).cells


def _alone(cells, run_dir: Path) -> dict[str, dict]:
    return {c.id: run_cell(c, run_dir) for c in cells}


def _copy_teachers(src: Path, dst: Path) -> None:
    """The teacher trained by the unshared run, so the shared run does not train it again."""
    shutil.copytree(src / "teachers", dst / "teachers")


def _same(a, b, a_dir: Path, b_dir: Path) -> None:
    a, b = (r.to_dict() if hasattr(r, "to_dict") else r for r in (a, b))
    assert a["status"] == b["status"] == "done", (a.get("error"), b.get("error"))
    timing = {"train_s", "eval_s", "wall_s"}
    ma = {k: v for k, v in a["metrics"].items() if k not in timing}
    assert "top1" in ma and ma == {k: v for k, v in b["metrics"].items() if k not in timing}
    cid = a["cell"]["id"]
    sa = torch.load(a_dir / "cells" / cid / "student.pt", weights_only=True)
    sb = torch.load(b_dir / "cells" / cid / "student.pt", weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (a["cell"]["method"]["label"], k)


@pytest.mark.slow
def test_group_is_bit_identical_to_cells_run_alone(tiny_grid, tmp_path):
    # crd draws negatives from the global RNG, ft has an init stage, consistency sees other views,
    # ckakd groups the teacher's layers by CKA on the (shared) set-up probe
    methods = "[ce, kd, {dkd: {warmup: 1}}, fitnet, crd, {ft: {init_epochs: 1}}, consistency, ckakd]"
    cells = _cells(tiny_grid, methods)
    alone = _alone(cells, tmp_path / "alone")
    _copy_teachers(tmp_path / "alone", tmp_path / "group")
    teachers = SharedTeachers()
    finished: list[str] = []
    got = run_group(
        cells, tmp_path / "group", on_result=lambda r: finished.append(r.cell.id), teachers=teachers
    )
    assert sorted(finished) == sorted(c.id for c in cells)
    for r in got:
        _same(alone[r.cell.id], r, tmp_path / "alone", tmp_path / "group")
    # the teacher's forward was reused, not recomputed by every cell
    assert teachers.stats["hits"] > teachers.stats["misses"] > 0
    # one set-up probe of the teacher and one of the (identically initialised) student
    assert teachers.stats["probe_misses"] == 2
    assert teachers.stats["probe_hits"] == 2 * len(cells) - 1 - 2  # ce has no teacher probe


@pytest.mark.slow
def test_groups_split_on_what_the_teacher_sees(tiny_grid):
    cells = _cells(tiny_grid, "[ce, kd, dkd, fitnet, consistency]")
    by_method = {c.method.name: c for c in cells}
    assert group_key(by_method["ce"]) is None  # no teacher
    assert group_key(by_method["kd"]) == group_key(by_method["dkd"]) == group_key(by_method["fitnet"])
    assert group_key(by_method["consistency"]) != group_key(by_method["kd"])  # clean teacher view
    sizes = sorted(len(g) for g in plan_groups(cells))
    assert sizes == [1, 1, 3]


def test_groups_are_cut_so_workers_do_not_wait_on_one_group(tiny_grid):
    cells = _cells(tiny_grid, "[ce, kd, dkd, dist, fitnet]")
    groups = plan_groups(cells)
    assert sorted(len(g) for g in groups) == [1, 4]
    # one worker: nothing to gain, the group stays whole
    assert balance_groups(groups, 1) == groups
    # two workers: ce beside a group of four would leave one idle for most of the run
    cut = balance_groups(groups, 2)
    assert sorted(len(g) for g in cut) == [1, 2, 2]
    assert sorted(c.id for g in cut for c in g) == sorted(c.id for c in cells)
    assert all(len({group_key(c) for c in g}) == 1 for g in cut)  # each part still one group
    # many workers: every cell its own job
    assert sorted(len(g) for g in balance_groups(groups, 8)) == [1, 1, 1, 1, 1]
    # quickstart-like: two equal groups and two lone cells on two workers stay whole
    two = plan_groups(plan(load_grid(tiny_grid(methods="[ce, kd, dkd, fitnet]", seeds="[0, 1]"))).cells)
    assert sorted(len(g) for g in two) == [1, 1, 3, 3] and balance_groups(two, 2) == two


@pytest.mark.slow
def test_a_failing_cell_leaves_the_group(tiny_grid, tmp_path):
    cells = _cells(tiny_grid, "[kd, {kd: {weights: {kd: 1.0e+300}}}, fitnet]", epochs=1)
    alone = _alone([cells[0], cells[2]], tmp_path / "alone")
    _copy_teachers(tmp_path / "alone", tmp_path / "group")
    got = {r.cell.id: r for r in run_group(cells, tmp_path / "group")}
    bad = got[cells[1].id]
    assert bad.status == "failed" and "FloatingPointError" in bad.error
    assert (tmp_path / "group" / "cells" / cells[1].id / "result.json").exists()
    for c in (cells[0], cells[2]):
        _same(alone[c.id], got[c.id], tmp_path / "alone", tmp_path / "group")


@pytest.mark.slow
def test_interrupted_group_resumes_to_the_same_numbers(tiny_grid, tmp_path, monkeypatch):
    cells = _cells(tiny_grid, "[kd, fitnet, dkd]", epochs=3)
    alone = _alone(cells, tmp_path / "alone")
    _copy_teachers(tmp_path / "alone", tmp_path / "group")

    def stop(cell):
        def progress(row):  # the second cell stops the whole group after its first epoch
            if cell.id == cells[1].id and row["stage"] == "train" and row["epoch"] == 1:
                raise KeyboardInterrupt

        return progress

    with pytest.raises(KeyboardInterrupt):
        run_group(cells, tmp_path / "group", progress=stop)
    cdirs = [tmp_path / "group" / "cells" / c.id for c in cells]
    # killed mid-group: the first two cells checkpointed epoch 1, the third had not finished it
    assert [(d / "checkpoint.pt").exists() for d in cdirs] == [True, True, False]
    assert not any((d / "result.json").exists() for d in cdirs)
    # killed again mid-epoch: 7 steps of the cell behind alone, then 5 of the synced group
    step, calls = Trainer.train_step, {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_group(cells, tmp_path / "group")
    assert not any((d / "result.json").exists() for d in cdirs)
    # a stop request (SIGTERM) mid-epoch: every cell of the group checkpoints where it is
    calls["n"] = 0

    def stopping_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            request_stop()
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", stopping_step)
    try:
        with pytest.raises(StopRequested):
            run_group(cells, tmp_path / "group")
    finally:
        clear_stop()
    monkeypatch.setattr(Trainer, "train_step", step)
    for d in cdirs:
        ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
        assert ckpt["trainer"].get("partial"), d.name  # mid-epoch position saved
    teachers = SharedTeachers()
    got = run_group(cells, tmp_path / "group", teachers=teachers)
    for r in got:
        _same(alone[r.cell.id], r, tmp_path / "alone", tmp_path / "group")
    assert teachers.stats["hits"] > 0  # the cell behind caught up, then they shared again


@pytest.mark.slow
def test_grid_throughput_benchmark_runs_and_checks_identity(tmp_path):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(
        "grid_throughput", ROOT / "benchmarks" / "grid_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    args = ["--teacher", "resnet8", "--student", "resnet8", "--methods", "ce,kd,fitnet", "--steps", "2"]
    args += ["--batch-size", "8", "--test-images", "16", "--check", "--json", str(out)]
    assert bench.main([*args, "--keep", str(tmp_path / "work")]) == 0
    got = __import__("json").loads(out.read_text())
    assert got["bit_identical"] is True and got["images_per_cell"] == 16
    assert got["teacher_forwards"]["hits"] == 2  # fitnet reused kd's teacher forward at each step
    # one probe of the teacher, one of the student: ce, kd and fitnet start from the same weights
    assert got["teacher_forwards"]["probe_misses"] == 2 and got["teacher_forwards"]["probe_hits"] == 3
    assert got["speedup"] > 0 and got["kd_vs_bare"] > 0
    assert got["group_timings"]["step_calls"] == 3  # each cell's first of 2 steps; the last one finishes
    assert got["teacher_forward_s"] > 0 and got["amdahl_train_bound"] > 1  # two cells share the teacher


@pytest.mark.slow
def test_share_teacher_in_the_grid_runs_groups_through_the_cli(tiny_grid, tmp_path):
    import json

    from tests.conftest import kdbench_cli

    grid = tiny_grid(methods="[ce, kd, fitnet]")
    grid.write_text(grid.read_text() + "executor: {share_teacher: true}\n")
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr
    assert "done 3" in r.stdout + r.stderr
    cells = plan(load_grid(grid)).cells  # share_teacher is not part of any cell id
    assert cells == _cells(tiny_grid, "[ce, kd, fitnet]", epochs=1)
    _copy_teachers(tmp_path / "runs" / "tiny", tmp_path / "alone")
    alone = _alone(cells, tmp_path / "alone")
    for c in cells:
        shared = json.loads((tmp_path / "runs" / "tiny" / "cells" / c.id / "result.json").read_text())
        _same(alone[c.id], shared, tmp_path / "alone", tmp_path / "runs" / "tiny")


def _tiny_net(seed: int) -> tuple[torch.nn.Module, TapSpec]:
    torch.manual_seed(seed)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    return net, TapSpec(stages=("2",), classifier="4")


def test_set_up_probe_is_shared_only_between_bitwise_equal_models():
    teachers = SharedTeachers()
    x = torch.randn(5, 3, 8, 8)
    cell = SimpleNamespace(student=SimpleNamespace(model_dump=lambda mode: {"name": "net"}))
    other = SimpleNamespace(student=SimpleNamespace(model_dump=lambda mode: {"name": "other"}))
    a, spec = _tiny_net(0)
    teachers.setting_up(cell)
    fa = teachers.probe(a, spec, x)
    b, _ = _tiny_net(0)  # built the same way: the same weights
    fb = teachers.probe(b, spec, x)
    assert teachers.stats["probe_hits"] == 1 and teachers.stats["probe_misses"] == 1
    assert torch.equal(fa.logits, fb.logits) and torch.equal(fa.stages[0], fb.stages[0])
    fb.stages[0].zero_()  # each cell owns its copy
    assert fa.stages[0].abs().sum() > 0
    c, _ = _tiny_net(1)  # other weights
    teachers.probe(c, spec, x)
    d, _ = _tiny_net(0)
    d[1].running_mean += 1  # other buffers
    teachers.probe(d, spec, x)
    teachers.probe(b, spec, x + 1)  # another batch
    teachers.setting_up(other)  # another student reference
    teachers.probe(_tiny_net(0)[0], spec, x)
    teachers.setting_up(None)  # not set up by a cell of the group: never shared
    teachers.probe(_tiny_net(0)[0], spec, x)
    assert teachers.stats["probe_hits"] == 1 and teachers.stats["probe_misses"] == 5
    teachers.end_setup()
    teachers.setting_up(cell)
    teachers.probe(_tiny_net(0)[0], spec, x)
    assert teachers.stats["probe_misses"] == 6  # forgotten once every cell has set up


def test_groups_split_on_the_teachers_arithmetic(tiny_grid):
    """A method row may set precision, channels_last or compile; the teacher's forward runs under
    the settings of the cell that computes it, so such cells never share one."""
    methods = "[kd, {kd: {train: {precision: bf16}}}, {fitnet: {train: {channels_last: true}}}, dkd]"
    cells = _cells(tiny_grid, methods, epochs=1)
    keys = [group_key(c) for c in cells]
    assert keys[0] == keys[3]  # fp32 kd and fp32 dkd share
    assert len({keys[0], keys[1], keys[2]}) == 3
    assert sorted(len(g) for g in plan_groups(cells)) == [1, 1, 2]


def test_shared_teacher_features_edited_in_place_are_not_lent_again():
    """A third-party method that edits the teacher's features in place (here: doubles the
    logits) must not change what the next cell of the group reads."""
    from kdbench.features import discover_taps
    from kdbench.models.smallcnn import smallcnn

    torch.manual_seed(0)
    model = smallcnn(num_classes=4, in_channels=1).eval()
    spec = discover_taps(model)
    teachers = SharedTeachers()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        first = teachers.reader(model, spec, ["logits"]).read(x)
        clean = first.logits.clone()
        first.logits.detach().mul_(2.0)  # the editing cell
        second = teachers.reader(model, spec, ["logits"]).read(x)
    assert torch.equal(second.logits, clean)
    assert teachers.stats["misses"] == 2 and teachers.stats["hits"] == 0
    with torch.no_grad():  # untouched features are lent as before
        third = teachers.reader(model, spec, ["logits"]).read(x)
    assert third.logits is second.logits and teachers.stats["hits"] == 1


@pytest.mark.slow
def test_a_mixed_precision_grid_shared_gives_the_unshared_numbers(tiny_grid, tmp_path):
    """fp32 kd, bf16 kd and channels_last fitnet: with share_teacher every cell gives exactly the
    numbers it gives unshared (before the group key knew precision, the fp32 cell reused the
    bf16 cell's teacher outputs when the bf16 row came first)."""
    from tests.conftest import done_metrics, kdbench_cli

    methods = "[{kd: {train: {precision: bf16}}}, kd, {fitnet: {train: {channels_last: true}}}]"
    grid = tiny_grid(methods=methods, epochs=1)
    r = kdbench_cli("run", str(grid), "--out", str(tmp_path / "alone"))
    assert r.returncode == 0, r.stderr
    grid.write_text(grid.read_text() + "executor: {share_teacher: true}\n")
    r = kdbench_cli("run", str(grid), "--out", str(tmp_path / "shared"))
    assert r.returncode == 0, r.stderr
    assert done_metrics(tmp_path / "shared") == done_metrics(tmp_path / "alone")
