"""SWA training hook: lr switch, weight average, BatchNorm recomputation, exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import TensorDataset

from kdbench.cells import TrainRecipe
from kdbench.engine.data import Batches
from kdbench.engine.train import Hook, LRSchedule, Stage, Trainer, TrainSetup, distill_loss
from kdbench.errors import ConfigError
from kdbench.features import FeatureReader
from kdbench.models.smallcnn import smallcnn
from kdbench.robustness.swa import SWA, check_swa

CFG = {
    "epochs": 4,
    "batch_size": 16,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "schedule": "constant",
    "milestones": [],
    "gamma": 0.1,
    "warmup_epochs": 0,
}


def _setup(seed: int = 0) -> TrainSetup:
    torch.manual_seed(seed)
    model = smallcnn(num_classes=3, in_channels=1, width=2)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 1, 12, 12, generator=g), torch.randint(0, 3, (48,), generator=g))
    return TrainSetup(
        student=model,
        student_reader=FeatureReader(model, model.kd_taps, ("logits",)),
        recipe=TrainRecipe(**CFG),
        train_data=Batches(data, 16),
        device=torch.device("cpu"),
        seed=seed,
        augment=lambda x, gen: x,
    )


class _Record(Hook):
    name = "record"

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.params: list[list[torch.Tensor]] = []

    def after_epoch(self, trainer, epoch, row):
        self.lrs.append(row["lr"])  # the lr the epoch trained with
        self.params.append([p.detach().clone() for p in trainer.setup.student.parameters()])


class _Stop(Hook):
    """Interrupts the run after an epoch, where the engine would have saved its checkpoint."""

    name = "stop"

    def __init__(self, after: int):
        self.after = after

    def after_epoch(self, trainer, epoch, row):
        if epoch == self.after:
            raise InterruptedError


def _trainer(setup: TrainSetup, rec: Hook, *extra: Hook, **swa) -> tuple[Trainer, SWA]:
    params = list(setup.student.parameters())
    stage = Stage("train", CFG["epochs"], params, distill_loss(setup), TrainRecipe(**CFG), 7)
    hook = SWA(setup, **swa)
    # the recorder runs before SWA's after_epoch, so it sees each epoch's own weights
    return Trainer(setup, stage, [LRSchedule(), rec, hook, *extra]), hook


def test_swa_averages_the_last_epochs_and_recomputes_batchnorm():
    setup = _setup()
    rec = _Record()
    trainer, _ = _trainer(setup, rec, start=0.5, lr=0.01)
    trainer.run()
    assert rec.lrs == [0.1, 0.1, pytest.approx(0.01), pytest.approx(0.01)]
    avg = [(a + b) / 2 for a, b in zip(rec.params[2], rec.params[3], strict=True)]
    for p, q in zip(setup.student.parameters(), avg, strict=True):
        torch.testing.assert_close(p.detach(), q)
    # BatchNorm statistics are those of the averaged weights over the training split
    model = setup.student
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    again = copy.deepcopy(model)
    update_bn((x for x, _, _ in setup.train_data.iterate(None, False)), again)
    for k, v in again.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(stats[k], v)


def test_swa_resumes_exactly_from_its_state():
    full = _setup()
    _trainer(full, _Record(), start=0.25, lr=0.02, anneal_epochs=2)[0].run()

    part = _setup()
    t1, _ = _trainer(part, _Record(), _Stop(1), start=0.25, lr=0.02, anneal_epochs=2)
    with pytest.raises(InterruptedError):
        t1.run()
    state, weights = t1.state_dict(), copy.deepcopy(part.student.state_dict())
    resumed = _setup(seed=0)
    resumed.student.load_state_dict(weights)
    t2, _ = _trainer(resumed, _Record(), start=0.25, lr=0.02, anneal_epochs=2)
    t2.load_state_dict(state)
    t2.run(start_epoch=2)
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_swa_settings_are_checked():
    full = {"start": 0.75, "lr": None, "anneal_epochs": 1}
    assert check_swa(None) is None and check_swa(False) is None and check_swa(True) == full
    assert check_swa({"start": 0.5}) == {**full, "start": 0.5}
    with pytest.raises(ConfigError, match="unknown key"):
        check_swa({"begin": 0.5})
    with pytest.raises(ConfigError, match="fraction"):
        check_swa({"start": 1.5})
