"""The results store: journal mode by filesystem, per-epoch rows and the grid imported with results."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from kdbench.report import open_run, report
from kdbench.store import JOURNAL_ENV, JournalModeError, Store, filesystem_type, journal_mode


def _mounts(tmp_path: Path, run_dir: Path, fstype: str) -> Path:
    f = tmp_path / "mounts"
    f.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        f"server:/export {run_dir.parent} {fstype} rw,vers=4.2 0 0\n"
        "tmpfs /dev/shm tmpfs rw 0 0\n"
    )
    return f


def test_filesystem_type_is_that_of_the_longest_mount_point_above(tmp_path):
    run_dir = tmp_path / "share" / "runs" / "grid"
    mounts = _mounts(tmp_path, tmp_path / "share" / "runs", "nfs4")
    assert filesystem_type(run_dir, mounts) == "nfs4"
    assert filesystem_type(tmp_path / "elsewhere", mounts) == "ext4"
    spaced = tmp_path / "mounts2"
    spaced.write_text(f"/dev/vda / ext4 rw 0 0\nfs@tcp:/x {tmp_path}/my\\040runs lustre rw 0 0\n")
    assert filesystem_type(tmp_path / "my runs" / "g", spaced) == "lustre"
    assert filesystem_type(tmp_path, tmp_path / "no-such-file") is None


@pytest.mark.parametrize("fstype", ["nfs", "nfs4", "lustre", "gpfs", "cifs"])
def test_network_filesystems_get_a_rollback_journal(tmp_path, monkeypatch, fstype):
    import kdbench.store as store_mod

    mounts = _mounts(tmp_path, tmp_path / "runs" / "g", fstype)
    monkeypatch.delenv(JOURNAL_ENV, raising=False)
    monkeypatch.setattr(store_mod, "filesystem_type", lambda p: filesystem_type(p, mounts))
    run_dir = tmp_path / "runs" / "g"
    assert journal_mode(run_dir) == "delete"
    s = Store(run_dir / "results.sqlite")
    assert s.journal == "delete"
    s.close()
    assert journal_mode(tmp_path / "local") == "wal"


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_both_journal_modes_record_and_read(tmp_path, monkeypatch, mode):
    monkeypatch.setenv(JOURNAL_ENV, mode)
    s = Store(tmp_path / "results.sqlite")
    assert s.journal == mode
    cell = {"id": "c1", "method": {"label": "kd"}}
    s.record({"cell": cell, "status": "done", "metrics": {"top1": 1.0}}, [{"epoch": 0, "test/top1": 1.0}])
    s.close()
    db = sqlite3.connect(tmp_path / "results.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == mode  # the mode is in the file
    db.close()
    r = Store.read_only(tmp_path / "results.sqlite")
    assert r.cells()[0]["metrics"] == {"top1": 1.0} and r.epochs("c1") == [{"epoch": 0, "test/top1": 1.0}]
    r.close()


def test_a_store_moved_to_a_network_filesystem_leaves_wal(tmp_path, monkeypatch):
    monkeypatch.setenv(JOURNAL_ENV, "wal")
    Store(tmp_path / "results.sqlite").close()
    monkeypatch.setenv(JOURNAL_ENV, "delete")
    s = Store(tmp_path / "results.sqlite")
    assert s.journal == "delete"
    s.close()
    assert not (tmp_path / "results.sqlite-wal").exists()


def test_a_bad_journal_setting_says_what_to_use(tmp_path, monkeypatch):
    monkeypatch.setenv(JOURNAL_ENV, "memory")
    with pytest.raises(JournalModeError, match="use wal .* or delete"):
        Store(tmp_path / "results.sqlite")


def _cell_dir(run_dir: Path, cid: str, method: str, seed: int, curve: list[float]) -> Path:
    d = run_dir / "cells" / cid
    d.mkdir(parents=True)
    cell = {
        "id": cid,
        "dataset": {"name": "digits"},
        "teacher": {"id": "t1", "label": "T"},
        "student": {"label": "S"},
        "method": {"name": method, "label": method},
        "seed": seed,
        "train": {"epochs": len(curve)},
        "uses_teacher": method != "ce",
    }
    result = {"cell": cell, "status": "done", "metrics": {"top1": curve[-1]}, "env": {}, "wall_s": 1.0}
    (d / "result.json").write_text(json.dumps(result))
    rows = [json.dumps({"stage": "init", "epoch": 0})]
    rows += [
        json.dumps({"stage": "train", "epoch": e, "test/top1": v, "val/top1": v}) for e, v in enumerate(curve)
    ]
    (d / "metrics.jsonl").write_text("\n".join(rows) + "\n{cut by a cra")
    return d


def test_import_cell_records_result_and_epochs_and_reports_need_no_cell_files(tmp_path):
    s = Store(tmp_path / "results.sqlite")
    for i, method in enumerate(("ce", "kd")):
        result = s.import_cell(_cell_dir(tmp_path, f"c{i}", method, 0, [70.0, 80.0 + i, 75.0]))
        assert result["cell"]["id"] == f"c{i}"
    assert [r["epoch"] for r in s.epochs("c0")] == [0, 1, 2]  # stage "init" and the cut line left out
    s.record_grid("name: g\nreference: {kd: {T->S: 80.5}}\n", ["c0", "c1"])
    s.close()
    for f in [*tmp_path.glob("cells/*/*")]:
        f.unlink()  # reports read the store alone
    run = open_run(tmp_path)
    assert run.epochs("c1")[1] == {"stage": "train", "epoch": 1, "test/top1": 81.0, "val/top1": 81.0}
    out = report(tmp_path, select="best_val")
    assert "81.00 (1)" in out and "80.50" in out  # best validation epoch; the stored grid's paper number


def test_runs_imported_before_epochs_were_stored_still_read_metrics_jsonl(tmp_path):
    d = _cell_dir(tmp_path, "c0", "kd", 0, [70.0, 90.0, 75.0])
    s = Store(tmp_path / "results.sqlite")
    s.record(json.loads((d / "result.json").read_text()))  # the old import: no rows
    s.close()
    assert "90.00 (1)" in report(tmp_path, select="best_val")


def test_record_grid_limits_the_report_to_the_grid_last_run(tmp_path):
    s = Store(tmp_path / "results.sqlite")
    for i in range(2):
        s.import_cell(_cell_dir(tmp_path, f"c{i}", "kd", i, [70.0 + i]))
    s.record_grid("name: g\n", ["c1"])
    s.close()
    assert "71.00 (1)" in report(tmp_path) and "70.50" not in report(tmp_path)
    assert "70.50 ± 0.71 (2)" in report(tmp_path, everything=True)


def test_planning_refreshes_an_older_row_label_and_keeps_everything_else(tmp_path):
    """A row label is presentation: cells stored under an older label of the same row (a newer
    kdbench names rows differently) take the plan's label, so reruns never split a row."""
    s = Store(tmp_path / "results.sqlite")
    old = {"id": "c1", "method": {"name": "kd", "label": "kd(train.jtt={'epochs': 1})"}, "seed": 0}
    s.add_pending([old])
    new = {**old, "method": {"name": "kd", "label": "kd(train.jtt.epochs=1)"}}
    s.add_pending([new, {"id": "c2", "method": {"name": "ce", "label": "ce"}, "seed": 1}])
    rows = dict(s.db.execute("SELECT id, config FROM cells").fetchall())
    assert json.loads(rows["c1"]) == new
    assert json.loads(rows["c2"])["method"]["label"] == "ce"
