"""Just Train Twice (Liu, Haghgoo, Chen, Raghunathan, Koh, Sagawa, Liang, Finn, ICML 2021).

Stage 1 (identification): an ERM model trained for ``epochs`` (T) epochs. Its error set E is
the training samples it misclassifies. Stage 2: the cell's own training (any method) on the
training split with E upsampled, each sample of E drawn ``lambda_up`` more times per epoch.

Matching the reference (anniesch/jtt ``run_expt.py``): the upweighting is oversampling, not loss
weighting. The reference concatenates the training set with ``Subset(train, E * up_weight)``
and shuffles the concatenation, so a sample of E appears ``1 + up_weight`` times per epoch and
the epoch grows by ``|E| * up_weight`` samples; kdbench draws each epoch's order as a random
permutation of the same multiset (``Batches.upweight``), with ``lambda_up`` = ``--up_weight``.
Where kdbench differs, on purpose:

* E is read from the finished stage-1 model in eval mode on the unaugmented training split
  (the paper's definition). The reference script takes the predictions its training loop logged
  during epoch T (train mode, weights changing batch by batch); those are not a model's answer.
* Stage 1 is the cell's own recipe (student architecture, optimiser, lr, schedule, batch size,
  augmentation) run for ``epochs`` epochs with plain cross-entropy, shuffled batches and no
  dataset-level augmenter; the schedule spans those T epochs (the reference stops a longer
  constant-lr run at epoch T).
* The hold-out validation share (``eval.val_fraction``) is left out of both stages.

Stage 1 is a cached artefact built like a teacher (kdbench/engine/cell.py ``obtain_teacher``):
keyed by the hash of its spec, trained once under a file lock and checksummed, in
``<run>/jtt/<id>.pt`` with ``<run>/jtt/<id>/result.json`` (its own test metrics) and
``error_set.json`` (size, share per group, which positions). Cells that share the spec (every
method and seed, with the default ``seed: 0``) share it; ``seed: per_cell`` gives each seed its
own. Setting: ``train: {jtt: {epochs: T, lambda_up: 20}}`` for any method, or the method ``jtt``
(the student alone: ``ce`` with that setting). The paper tunes T and lambda_up on the worst-group
accuracy of a validation split (e.g. CelebA T=1, lambda_up=50; Waterbirds T=60, lambda_up=100).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from kdbench import registry
from kdbench.artifacts import file_lock, write_json_atomic
from kdbench.cells import JTT_DEFAULTS as DEFAULTS  # noqa: F401 - the setting is a record's
from kdbench.cells import check_jtt  # noqa: F401
from kdbench.errors import ConfigError
from kdbench.features import FeatureReader, Features, TapSpec
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

#: where stage-1 models live in a run directory
CACHE = "jtt"
#: recipe fields stage 1 leaves at their defaults: plain ERM on one process (shuffled batches, CE,
#: no SWA, the teacher's forward not involved)
_NOT_ERM = ("jtt", "objective", "sampler", "swa", "method", "teacher_view", "teacher_outputs")
_NOT_ERM += ("gpus_per_cell", "nodes", "sync_bn")


def identification_spec(cell: Any, jtt: dict[str, Any]) -> Any:
    """The stage-1 model of ``cell`` as a teacher spec (its hash is the cache key)."""
    from kdbench.cells import CELL_FORMAT, TeacherSpec

    aug = cell.augment
    if getattr(registry.load("augmenters", aug.name), "dataset_level", False):
        aug = {"name": "none", "params": {}}  # ERM: no generated samples
    fields = type(cell.train).model_fields
    plain = {k: fields[k].get_default(call_default_factory=True) for k in _NOT_ERM if k in fields}
    recipe = cell.train.model_copy(update={**plain, "epochs": jtt["epochs"], "views": {}})
    aug_name = aug["name"] if isinstance(aug, dict) else aug.name
    return TeacherSpec.build(
        format=CELL_FORMAT,
        model={"name": cell.student.name, "params": cell.student.params},
        label=f"{cell.student.label}[jtt stage 1, {jtt['epochs']} epochs]",
        source={"name": "recipe", "params": {}, "fingerprint": {"source": "recipe"}},
        dataset=cell.dataset,
        train=recipe.model_dump(mode="json"),
        augment=aug if isinstance(aug, dict) else aug.model_dump(mode="json"),
        seed=cell.seed if jtt["seed"] == "per_cell" else jtt["seed"],
        plugins=registry.versions(
            [("models", cell.student.name), ("datasets", cell.dataset.name), ("augmenters", aug_name)]
        ),
        val_fraction=cell.eval.val_fraction,
    )


@torch.no_grad()
def error_set(model: nn.Module, taps: TapSpec, train: Any, device: torch.device) -> Tensor:
    """Positions (ascending) of the training split's own samples that ``model`` misclassifies,
    in eval mode, on the unaugmented images."""
    was = model.training
    model.eval()
    reader = FeatureReader(model, taps, ["logits"])
    wrong: list[Tensor] = []
    try:
        for x, y, pos in train.iterate(None, drop_singletons=False):
            keep = pos < train.n_base  # never generated samples
            logits = reader.read(x[keep].to(device)).logits
            wrong.append(pos[keep][(logits.argmax(1).cpu() != y[keep])])
    finally:
        reader.close()
        model.train(was)
    return torch.cat(wrong).sort().values if wrong else torch.zeros(0, dtype=torch.long)


def upsample(
    cell: Any,
    jtt: dict[str, Any],
    train: Any,
    run_dir: Path,
    device: torch.device,
    log: Any = None,
    *,
    obtain_teacher: Callable[..., Any],
) -> dict[str, Any]:
    """Obtain (or load) ``cell``'s stage-1 model, find its error set on ``train`` and upsample it
    there (``train.upweight``); returns the error set's summary (also in ``error_set.json``).

    ``obtain_teacher`` is the engine's teacher cache (``kdbench.engine.cell.obtain_teacher``),
    handed in by the engine so that this module does not import it back."""
    spec = identification_spec(cell, jtt)
    model, taps = obtain_teacher(
        spec, Path(run_dir), device, cell.eval.batch_size, cell.eval.ece_bins, cache=CACHE
    )
    wrong = error_set(model, taps, train, device)
    train.upweight = (wrong, int(jtt["lambda_up"]))
    summary = _summary(spec.id, wrong, train, jtt)
    work = Path(run_dir) / CACHE / spec.id
    with file_lock(work.parent / f"{spec.id}.lock"):
        if not (work / "error_set.json").exists():
            write_json_atomic(work / "error_set.json", {**summary, "positions": wrong.tolist()})
    (log or logging.getLogger(__name__)).info("jtt: %s", json.dumps(summary))
    return summary


def _summary(spec_id: str, wrong: Tensor, train: Any, jtt: dict[str, Any]) -> dict[str, Any]:
    n = int(train.n_base)
    out: dict[str, Any] = {
        "stage1": spec_id,
        "epochs": jtt["epochs"],
        "lambda_up": jtt["lambda_up"],
        "train_size": n,
        "error_set_size": len(wrong),
        "epoch_size": n + len(wrong) * int(jtt["lambda_up"]),
    }
    groups = train.meta.get("group")
    if groups is not None:
        g = groups[:n]
        counts = torch.bincount(g.clamp_min(0))
        errs = torch.bincount(g[wrong].clamp_min(0), minlength=len(counts))
        out["error_rate_by_group"] = {
            str(k): round(float(errs[k]) / max(int(counts[k]), 1), 4) for k in range(len(counts))
        }
    return out


class JTTStudent(Distiller):
    """The student alone trained JTT's way: cross-entropy on the error-set-upsampled split."""

    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=())
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0}
    requires_teacher: ClassVar[bool] = False

    def __init__(
        self, ctx: MethodContext, epochs: int = 1, lambda_up: int = 20, seed: int | Literal["per_cell"] = 0
    ):
        super().__init__(ctx)
        check_jtt({"epochs": epochs, "lambda_up": lambda_up, "seed": seed})

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Config-time check of a grid's parameters (the values' ranges)."""
        try:
            check_jtt(params)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def train_for(
        cls, epochs: int = 1, lambda_up: int = 20, seed: int | Literal["per_cell"] = 0
    ) -> dict[str, Any]:
        """The ``train`` fields this method sets for its cells: the JTT setting (the engine's)."""
        return {"jtt": check_jtt({"epochs": epochs, "lambda_up": lambda_up, "seed": seed})}

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        return {}
