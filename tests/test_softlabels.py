"""Soft-label replay (kdbench/engine/softlabels.py): exact replay is bitwise the computing cell, the
top-k format and size, feature methods refused, a killed build resumes, a changed bank is detected,
FerKD's rule on a hand-made example."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdbench.artifacts import ArtifactCorrupt, load_checked
from kdbench.augment.basic import FlipCrop
from kdbench.cells import check_teacher_outputs
from kdbench.config import load_grid
from kdbench.engine import cell as engine
from kdbench.engine import softlabels as sl
from kdbench.errors import ConfigError
from kdbench.runner import plan
from tests.conftest import write_grid

GRID = """
name: sl
output: {out}
datasets: [{{digits: {{limit: 300}}}}]
pairs: [{{teacher: {{smallcnn: {{width: 8}}}}, student: {{smallcnn: {{width: 4}}}}}}]
methods: {methods}
train: {{epochs: 2, batch_size: 64, lr: 0.1, schedule: cosine, views: {{}},
         augment: {{flip_crop: {{padding: 1}}}}}}
teacher_train: {{epochs: 5, batch_size: 32, optimizer: adamw, lr: 0.01, weight_decay: 0.0, schedule: cosine}}
"""

METHODS = """
  - kd
  - kd: {train: {teacher_outputs: {store: exact}}}
  - kd: {train: {teacher_outputs: {top_k: 3, ferkd: {relabel_below: 0.3, drop_above: 0.3}}}}
"""


def _plan(tmp: Path, methods: str = METHODS):
    g = write_grid(tmp / "g.yaml", GRID.format(out=tmp / "runs", methods=methods))
    return plan(load_grid(g))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The three cells of METHODS run inline: computed, exact replay, top-k + FerKD replay."""
    tmp = tmp_path_factory.mktemp("sl")
    p = _plan(tmp)
    results = [engine.run_cell(c, p.run_dir) for c in p.cells]
    for r in results:
        assert r.status == "done", r.error
    return p, results


def _bank(p, cell) -> Path:
    banks = [json.loads(m.read_text()) for m in (p.run_dir / "softlabels").glob("*/bank.json")]
    (m,) = [m for m in banks if m["key"]["store"] == cell.train.teacher_outputs["store"]]
    return p.run_dir / "softlabels" / m["id"]


def _rows(p, cell) -> list[dict]:
    text = (p.run_dir / "cells" / cell.id / "metrics.jsonl").read_text()
    return [{k: v for k, v in json.loads(ln).items() if not k.endswith("_s")} for ln in text.splitlines()]


def _student(p, cell) -> dict:
    return torch.load(p.run_dir / "cells" / cell.id / "student.pt", weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exact_replay_is_bitwise_the_computing_cell(ran):
    p, (computed, exact, topk) = ran
    c0, c1, c2 = p.cells
    assert c0.train.teacher_outputs == "compute" and sl.is_replay(c1.train.teacher_outputs)
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}  # noqa: E731
    assert strip(exact.metrics) == strip(computed.metrics)
    assert _rows(p, c1) == _rows(p, c0)  # every epoch's losses
    assert _same_weights(_student(p, c1), _student(p, c0))
    # the comparison can fail: the top-k + FerKD bank trains another student
    assert not _same_weights(_student(p, c2), _student(p, c0))
    assert "soft-label bank" in (p.run_dir / "cells" / c1.id / "log.txt").read_text()


def test_replay_key_is_recorded_only_when_set(ran):
    p, _ = ran
    c0, c1, _ = p.cells
    assert "teacher_outputs" not in c0.to_dict()["train"]  # existing cells keep their ids
    want = {"mode": "replay", "store": "exact", "top_k": 10, "ferkd": None}
    assert c1.to_dict()["train"]["teacher_outputs"] == want
    assert c0.teacher.id == c1.teacher.id  # one teacher, trained once


def test_topk_storage_format_and_size(ran):
    p, _ = ran
    cell = p.cells[2]
    bank = _bank(p, cell)
    manifest = json.loads((bank / "bank.json").read_text())
    ep = load_checked(sl.epoch_path(bank, 0))
    lab = ep["labels"]["teacher"]
    n = len(ep["positions"])
    assert set(ep["labels"]) == {"teacher"}  # kd reads no extra view
    dtypes = (lab["prob"].dtype, lab["index"].dtype, lab["rest"].dtype)
    assert dtypes == (torch.float16, torch.int16, torch.float16)
    assert lab["prob"].shape == lab["index"].shape == (n, 3)
    assert ep["crops"].dtype == torch.int16 and ep["crops"].shape == (n, 3)
    assert ep["crops"][:, 1:].abs().max() <= 1  # (flip, top, left) within the padding
    assert ep["positions"].dtype == torch.int32 and ep["calib"].dtype == torch.int8
    # 4 k + 2 label bytes, 6 crop bytes, 4 position bytes, 1 FerKD code per crop
    assert manifest["payload_bytes_per_crop"] == 4 * 3 + 2 + 6 + 4 + 1
    assert manifest["crops"] == 2 * n and manifest["epochs"] == 2
    # decoded logits keep the top-k probabilities and put the remaining mass on the other classes
    z = sl.decode(lab, 0, n, 10)
    q = z.softmax(1)
    kept = (ep["calib"] == sl.KEPT).nonzero().flatten()
    assert torch.allclose(q.gather(1, lab["index"].long())[kept], lab["prob"].float()[kept], atol=2e-3)


def test_topk_decode_is_exact_when_k_covers_every_class():
    z = torch.randn(6, 5) * 3
    enc = sl.encode(z, "topk", 5)
    back = sl.decode(enc, 0, 6, 5)
    assert torch.allclose(back.softmax(1), z.softmax(1), atol=1e-3)
    assert torch.equal(sl.decode(sl.encode(z, "exact", 0), 0, 6, 5), z)


def test_recorded_crops_are_those_the_student_draws():
    aug = FlipCrop(padding=2)
    x = torch.randn(5, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    crops = sl.flip_crop_params(aug, 5, state)
    assert torch.equal(sl.apply_flip_crop(x, crops, 2), aug(x, g))
    assert torch.equal(g.get_state(), _drawn(aug, 5, state))  # the draw leaves the stream as FlipCrop does


def _drawn(aug: FlipCrop, n: int, state: torch.Tensor) -> torch.Tensor:
    g = torch.Generator()
    g.set_state(state)
    aug(torch.zeros(n, 1, 4, 4), g)
    return g.get_state()


def test_feature_methods_refuse_replay_at_plan_time(tmp_path):
    with pytest.raises(ConfigError) as e:
        _plan(tmp_path, "[kd, {fitnet: {train: {teacher_outputs: replay}}}]")
    assert "fitnet" in str(e.value) and "stages" in str(e.value) and "logits" in str(e.value)
    # grid-wide: a ce baseline (no teacher) and logit methods plan; crd does not
    body = GRID.replace("views: {{}},", "views: {{}}, teacher_outputs: replay,")
    g = write_grid(tmp_path / "w.yaml", body.format(out=tmp_path / "r", methods="[ce, kd, dkd, dist]"))
    assert len(plan(load_grid(g)).cells) == 4
    g = write_grid(tmp_path / "c.yaml", body.format(out=tmp_path / "r", methods="[kd, crd]"))
    with pytest.raises(ConfigError, match="crd reads the teacher's pooled features"):
        plan(load_grid(g))


def test_teacher_outputs_is_validated():
    assert check_teacher_outputs("replay")["store"] == "topk"
    assert check_teacher_outputs({"mode": "compute"}) == "compute"
    for bad in ({"store": "fp8"}, {"top_k": 0}, {"ferkd": {"drop_above": 2}}, {"topk": 5}, "teacher"):
        with pytest.raises(ConfigError):
            check_teacher_outputs(bad)


def test_resume_after_an_interrupted_build(ran, tmp_path, monkeypatch):
    p, _ = ran
    cell = p.cells[1]
    run_dir = tmp_path / "run"
    shutil.copytree(p.run_dir / "teachers", run_dir / "teachers")  # the same teacher, not retrained
    real, calls = sl.save_checked, []

    def killed_after_one_epoch(obj, path):
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the build dies while writing epoch 2
        return real(obj, path)

    monkeypatch.setattr(sl, "save_checked", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.prepare_softlabels(cell, run_dir)
    monkeypatch.setattr(sl, "save_checked", real)
    (bank,) = (run_dir / "softlabels").iterdir()
    assert sl.epochs_done(bank, 2) == 1 and not sl.is_complete(bank)
    resumed = []
    monkeypatch.setattr(sl, "save_checked", lambda obj, path: resumed.append(path) or real(obj, path))
    assert engine.prepare_softlabels(cell, run_dir) == bank
    assert [q.name for q in resumed] == ["epoch0001.pt"]  # epoch 1 was not built again
    reference = _bank(p, cell)
    assert bank.name == reference.name
    for e in range(2):
        a, b = load_checked(sl.epoch_path(bank, e)), load_checked(sl.epoch_path(reference, e))
        for k in ("positions", "offsets", "crops"):
            assert torch.equal(a[k], b[k])
        assert torch.equal(a["labels"]["teacher"]["logits"], b["labels"]["teacher"]["logits"])
        assert torch.equal(a["state"]["aug_gen"], b["state"]["aug_gen"])


def test_a_changed_bank_is_detected(ran, tmp_path):
    p, _ = ran
    cell = p.cells[1]
    bank = tmp_path / "bank"
    shutil.copytree(_bank(p, cell), bank)
    path = sl.epoch_path(bank, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    setup = _FakeSetup()
    replay = sl.Replay(bank, setup)  # bank.json verifies
    first = load_checked(sl.epoch_path(bank, 0))
    a, b = int(first["offsets"][0]), int(first["offsets"][1])
    replay.lookup(0, 0, first["positions"][a:b])  # epoch 1 is intact
    with pytest.raises(sl.BankMismatch, match="differ from the recorded"):
        replay.lookup(0, 0, first["positions"][a:b].flip(0))
    with pytest.raises(ArtifactCorrupt, match="epoch0001.pt is corrupt"):
        replay.lookup(1, 0, first["positions"][a:b])


class _FakeSetup:
    device = torch.device("cpu")
    base_augment = None
    augment = None


def test_ferkd_rule_on_a_hand_made_example():
    y = torch.tensor([0, 0, 0, 0])
    p = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # easy positive: kept
            [0.05, 0.60, 0.35],  # another class, confidently: dropped (background)
            [0.05, 0.48, 0.47],  # unsure, little of its class: relabelled
            [0.30, 0.40, 0.30],  # another class but not confidently, p[y] >= 0.1: kept
        ]
    )
    z, code = sl.ferkd_calibrate(p.log(), y, relabel_below=0.1, drop_above=0.5, smoothing=0.3)
    assert code.tolist() == [sl.KEPT, sl.DROPPED, sl.RELABELLED, sl.KEPT]
    q = z.softmax(1)
    assert torch.allclose(q[2], torch.tensor([0.8, 0.1, 0.1]))  # (1 - 0.3) onehot + 0.3 / 3
    assert torch.allclose(q[[0, 1, 3]], p[[0, 1, 3]])  # the others keep the teacher's label


def test_ferkd_bank_drops_and_relabels(ran):
    p, _ = ran
    cell = p.cells[2]
    bank = _bank(p, cell)
    ep = load_checked(sl.epoch_path(bank, 0))
    codes = ep["calib"].tolist()
    assert sl.DROPPED in codes and sl.RELABELLED in codes and sl.KEPT in codes
    replay = sl.Replay(bank, _FakeSetup())
    off = ep["offsets"]
    for step in range(len(off) - 1):
        a, b = int(off[step]), int(off[step + 1])
        _, _, keep = replay.lookup(0, step, ep["positions"][a:b])
        dropped = ep["calib"][a:b] == sl.DROPPED
        if keep is not None:
            assert torch.equal(keep, ~dropped)
        else:
            assert int((~dropped).sum()) < 2 or not bool(dropped.any())


def test_banks_can_be_built_ahead_of_the_run(ran):
    from kdbench.runner import build_softlabels

    p, _ = ran
    banks = build_softlabels(p)  # already built by the cells: found, not rebuilt
    assert banks == sorted({_bank(p, p.cells[1]), _bank(p, p.cells[2])})
    assert all(sl.is_complete(b) for b in banks)


def test_softlabels_command_builds_the_banks_ahead(tmp_path, capsys):
    """`kdbench softlabels GRID` trains the teacher, builds each bank once and prints where."""
    import sys

    from kdbench import cli

    g = write_grid(
        tmp_path / "g.yaml",
        GRID.format(out=tmp_path / "runs", methods="\n  - kd: {train: {teacher_outputs: replay}}\n  - kd\n"),
    )

    def kdbench(*args: str) -> tuple[int, str, str]:
        old, sys.argv = sys.argv, ["kdbench", *args]
        try:
            with pytest.raises(SystemExit) as e:
                cli.main()
        finally:
            sys.argv = old
        got = capsys.readouterr()
        return e.value.code, got.out, got.err

    code, out, err = kdbench("softlabels", str(g))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out
    bank = Path(lines[0])
    assert bank.parent == tmp_path / "runs" / "sl" / "softlabels" and sl.is_complete(bank)
    code, out, err = kdbench("softlabels", str(g), "--set", "methods=[kd]")
    assert code == 0 and out == "" and "no cell of this grid replays soft labels" in err
