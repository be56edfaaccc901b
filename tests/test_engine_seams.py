"""Engine seams: metadata in batches, validation hold-out, samplers, teacher views, dataset-level
augmenters, one evaluation pass with families and cached teacher logits, the training loop's errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from kdbench.cells import TrainRecipe
from kdbench.engine import evaluation as ev
from kdbench.engine.data import Batches, ExtraSamples, holdout
from kdbench.engine.train import TrainSetup, train
from kdbench.errors import ConfigError
from kdbench.features import FeatureReader, discover_taps
from kdbench.methods.base import Distiller, MethodContext, Taps
from kdbench.models.smallcnn import smallcnn

CFG = {
    "epochs": 2,
    "batch_size": 16,
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "schedule": "cosine",
    "milestones": [],
    "gamma": 0.1,
    "checkpoint_every": 1,
}


def _data(n: int = 48, seed: int = 0) -> tuple[TensorDataset, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 4
    group = y * 2 + (torch.arange(n) % 3 == 0).long()  # unequal groups
    return TensorDataset(x, y), {"group": group}


def _model(seed: int = 0):
    torch.manual_seed(seed)
    m = smallcnn(4, 1, 4)
    return m, FeatureReader(m, discover_taps(m), ["logits"])


class Recorder(Distiller):
    """Records what each step received; a KD-like term on logits."""

    taps = Taps(student=("logits",), teacher=("logits",))
    default_weights = {"ce": 1.0, "rec": 1.0}

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.seen: list[dict] = []
        self.stages: list[str] = []

    def begin_stage(self, stage: str) -> None:
        self.stages.append(stage)

    def forward(self, s, t, batch):
        self.seen.append({"x": batch.x.clone(), "t": t.logits.clone(), "meta": dict(batch.meta)})
        return {"rec": F.mse_loss(s.logits, t.logits)}


def _setup(tmp_path: Path | None, teacher_augment=None, **kw) -> TrainSetup:
    ds, meta = _data()
    student, s_reader = _model(1)
    teacher, t_reader = _model(2)
    teacher.eval()
    d = Recorder(MethodContext(num_classes=4, num_train=len(ds), epochs=2, batch_size=16))
    add = torch.full((1, 1, 1, 1), 3.0)
    return TrainSetup(
        student=student,
        student_reader=s_reader,
        recipe=TrainRecipe(**dict(CFG, **kw.pop("cfg", {}))),
        train_data=Batches(ds, 16, meta=meta),
        device=torch.device("cpu"),
        seed=0,
        augment=lambda x, g: x + add,  # the student's view: shifted by 3
        distiller=d,
        teacher_reader=t_reader,
        teacher_augment=teacher_augment,
        weights={"ce": 1.0, "rec": 1.0},
        workdir=tmp_path,
        **kw,
    )


def test_holdout_is_stratified_disjoint_and_stable():
    y = torch.arange(100) % 5
    keep, held = holdout(y, 0.2)
    assert len(held) == 20 and len(keep) == 80
    assert (
        set(keep.tolist()).isdisjoint(held.tolist()) and len(set(keep.tolist()) | set(held.tolist())) == 100
    )
    assert torch.bincount(y[held]).tolist() == [4] * 5  # stratified
    keep2, held2 = holdout(y, 0.2)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    ds, meta = _data(100)
    b = Batches(ds, 7, indices=keep, meta=meta)
    assert len(b) == 80 and torch.equal(b.targets(), ds.tensors[1][keep])
    assert torch.equal(b.meta["group"], meta["group"][keep])
    xs = torch.cat([x for x, _, _ in b.iterate(None, False)])
    assert torch.equal(xs, ds.tensors[0][keep])  # positions map to the kept rows


def test_group_balanced_sampler_is_seeded_and_balanced():
    ds, meta = _data(400)
    b = Batches(ds, 32, meta=meta)
    o1 = b.order(torch.Generator().manual_seed(3), "group_balanced")
    o2 = b.order(torch.Generator().manual_seed(3), "group_balanced")
    assert torch.equal(o1, o2)
    counts = torch.bincount(meta["group"][o1], minlength=8).float()
    present = counts[torch.bincount(meta["group"], minlength=8) > 0]
    assert present.min() > 0.6 * present.mean()  # vs. 2:1 imbalance without balancing
    with pytest.raises(ConfigError, match="group"):
        Batches(ds, 32).order(torch.Generator(), "group_balanced")


def test_teacher_sees_student_batch_by_default_or_clean(tmp_path):
    setup = _setup(None)
    train(setup)
    rec = setup.distiller.seen[0]
    # the teacher's logits were computed on the student's (shifted) batch
    with torch.no_grad():
        want = setup.teacher_reader.read(rec["x"]).logits
    assert torch.allclose(rec["t"], want)
    assert "group" in rec["meta"] and len(rec["meta"]["group"]) == len(rec["x"])
    assert setup.distiller.stages == ["train"]

    clean = _setup(None, teacher_augment=lambda x, g: x)
    train(clean)
    rec = clean.distiller.seen[0]
    with torch.no_grad():
        on_clean = clean.teacher_reader.read(rec["x"] - 3.0).logits
    assert torch.allclose(rec["t"], on_clean, atol=1e-5)


def test_non_finite_loss_names_epoch_step_and_terms():
    setup = _setup(None)
    setup.augment = lambda x, g: x * float("nan")
    with pytest.raises(FloatingPointError, match=r"epoch 1 step 0.*'rec'"):
        train(setup)


class Doubler:
    """A dataset-level augmenter: adds 4 samples of class 0 before every epoch."""

    dataset_level = True

    def on_epoch_start(self, epoch, ctx):
        x = torch.randn(4, 1, 8, 8, generator=ctx.generator)
        return ExtraSamples(x, torch.zeros(4, dtype=torch.long), {"group": torch.zeros(4, dtype=torch.long)})


def test_dataset_level_augmenter_grows_train_set_and_resumes(tmp_path):
    full = _setup(tmp_path / "full", dataset_augmenters=[Doubler()], cfg={"epochs": 3})
    train(full)
    assert len(full.train_data) == 48 + 12
    assert len(list((tmp_path / "full" / "extra").glob("*.pt"))) == 3
    ref = [p.detach().clone() for p in full.student.parameters()]

    calls = {"n": 0}

    def stop(row):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    cut = _setup(tmp_path / "cut", dataset_augmenters=[Doubler()], cfg={"epochs": 3}, progress=stop)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    again = _setup(tmp_path / "cut", dataset_augmenters=[Doubler()], cfg={"epochs": 3})
    train(again)
    assert len(again.train_data) == 60
    for a, b in zip(ref, again.student.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_truncated_checkpoint_is_moved_aside_and_the_run_restarts(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    setup = _setup(tmp_path)
    train(setup)
    assert (tmp_path / "checkpoint.pt.corrupt").exists() and not (tmp_path / "checkpoint.pt").exists()
    assert setup.distiller.stages == ["train"]


def test_one_pass_per_set_families_flat_names_and_cached_teacher_logits(tmp_path, monkeypatch):
    ds, meta = _data(40)
    sets = {
        "test": ev.EvalSet("test", Batches(ds, 16, meta=meta), key="k-test", per_epoch=True),
        "other": ev.EvalSet("other", Batches(ds, 16, meta=meta), key="k-other"),
    }
    calls: list[str] = []

    def fam(logits, y, meta, t_logits, ctx):
        calls.append(ctx.set_name)
        assert "group" in meta and (ctx.cheap or len(t_logits) == len(y))
        return {"groups_seen": float(len(meta["group"].unique()))}

    monkeypatch.setattr(ev, "FAMILIES", [ev.classification_family, fam])
    monkeypatch.setattr(ev, "AGGREGATES", [lambda per: {"n_sets": float(len(per))}])
    model, reader = _model()
    model.eval()
    n_forward = {"n": 0}

    def teacher_fn(x):
        n_forward["n"] += 1
        return reader.read(x).logits

    tl = ev.TeacherLogits(teacher_fn, torch.device("cpu"), tmp_path / "eval")
    per = ev.evaluate(lambda x: reader.read(x).logits, sets, torch.device("cpu"), ev.EvalContext(), tl)
    assert calls == ["test", "other"]
    flat = ev.final_metrics(per)
    assert flat["agreement"] == 100.0 and "top1" in flat and "other/top1" in flat and flat["n_sets"] == 2
    assert ev.epoch_metrics(per)["test/top1"] == flat["top1"]
    assert n_forward["n"] == 6  # 3 batches per set, once each
    again = ev.TeacherLogits(teacher_fn, torch.device("cpu"), tmp_path / "eval")
    assert torch.equal(again(sets["test"]), tl(sets["test"])) and n_forward["n"] == 6  # read from disk
    cheap = ev.evaluate(
        lambda x: reader.read(x).logits, sets, torch.device("cpu"), ev.EvalContext(), cheap=True
    )
    assert set(cheap["test"]) == {"top1", "nll", "groups_seen"}


def test_cell_logger_closes_its_file(tmp_path):
    from kdbench.engine.cell import cell_logger

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for i in range(50):
        d = tmp_path / f"c{i}"
        d.mkdir()
        with cell_logger(d / "log.txt") as log:
            log.info("hello")
    assert fds() <= before
    assert (tmp_path / "c0" / "log.txt").read_text().strip().endswith("hello")


def test_a_shipped_val_split_is_used_instead_of_a_hold_out(tmp_path):
    from kdbench.engine.cell import cell_data
    from tests.test_datasets import write_folder

    write_folder(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}, "test": {"a": 2, "b": 2}})
    ref = {"name": "imagefolder", "params": {"root": str(tmp_path), "image_size": 8}}
    data = cell_data(ref, 4, 8, val_fraction=0.5)
    assert len(data.train) == 6 and len(data.val) == 2 and len(data.test) == 4
    assert data.val.data.root.endswith("val")
    assert len(cell_data(ref, 4, 8).train) == 6 and cell_data(ref, 4, 8).val is None


def test_train_sampler_group_balanced_feeds_balanced_batches():
    def groups_seen(sampler: str) -> torch.Tensor:
        setup = _setup(None, cfg={"sampler": sampler, "epochs": 4})
        ds, meta = _data(240)
        setup.train_data = Batches(ds, 16, meta=meta)
        train(setup)
        return torch.bincount(torch.cat([r["meta"]["group"] for r in setup.distiller.seen]), minlength=8)

    plain, balanced = groups_seen("shuffle"), groups_seen("group_balanced")
    present = plain > 0
    ratio = lambda c: float(c[present].max() / c[present].min())  # noqa: E731
    assert ratio(plain) >= 1.9 and ratio(balanced) < 1.5


def test_stop_request_checkpoints_mid_epoch_and_resumes_bit_exactly(tmp_path):
    from kdbench.engine.train import StopRequested, clear_stop, request_stop

    def run(workdir: Path, stop_at: int | None):
        setup = _setup(workdir, dataset_augmenters=[Doubler()], cfg={"epochs": 3})
        calls = {"n": 0}
        shift = setup.augment

        def augment(x, g):  # counts steps; asks to stop during step `stop_at`
            calls["n"] += 1
            if calls["n"] == stop_at:
                request_stop()
            return shift(x, g) + 0.01 * torch.rand(x.shape, generator=g)  # draws from the aug RNG

        setup.augment = augment
        train(setup)
        return setup

    full = run(tmp_path / "full", None)
    clear_stop()
    with pytest.raises(StopRequested, match="epoch 2 step 2"):
        run(tmp_path / "cut", 6)  # 4 steps in epoch 1 (52 samples / 16); asked during epoch 2's step 1
    clear_stop()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["trainer"]["partial"]["step"] == 2
    resumed = run(tmp_path / "cut", None)
    for a, b in zip(full.student.parameters(), resumed.student.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())
    rows = lambda d: (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda r: {k: v for k, v in json.loads(r).items() if not k.endswith("_s")}  # noqa: E731
    assert [strip(r) for r in rows(tmp_path / "full")] == [strip(r) for r in rows(tmp_path / "cut")]


def test_training_split_metrics_never_count_generated_samples():
    """ConfiG adds samples to the training split between epochs; the group shares behind
    adj_avg_acc, train/... metrics and DFR-on-train must see the split's own samples only."""
    from types import SimpleNamespace

    from kdbench.engine.cell import CellData

    ds, meta = _data()
    train = Batches(ds, 16, meta=meta)
    data = CellData(SimpleNamespace(group_info=lambda: None), "k", train, None, train, 64)
    before = data.context(15)
    n = len(train)
    extra_meta = {k: torch.zeros(5, dtype=v.dtype) for k, v in meta.items()}
    train.add_samples(torch.zeros(5, *ds[0][0].shape), torch.zeros(5, dtype=torch.long), extra_meta)
    after = data.context(15)
    for ctx in (before, after):  # the context taken before a round is not extended by it either
        assert {k: len(v) for k, v in ctx.train_meta.items()} == {k: n for k in meta}
        assert len(ctx.train_targets) == n
        for k, v in meta.items():
            assert torch.equal(ctx.train_meta[k], v)
