"""The default diffusion model: a small class-conditional UNet2DModel trained with DDPM's noise
prediction loss on the student's own training split (or the data ``model.dataset`` names),
cached in the run directory.

Like teachers, it is a shared artefact: keyed by a hash of the recipe and the training images,
trained once under a file lock by whichever cell needs it first, saved with a checksum
(:mod:`kdbench.artifacts`). It trains with the engine's :class:`~kdbench.engine.train.Trainer`:
one stage whose loss is DDPM's noise prediction and whose epochs are single steps (batches are
drawn with replacement, so there is no pass over the data to call an epoch), the recipe's lr
schedule and the engine's :class:`~kdbench.engine.train.Checkpoint` hook. So a killed training
restarts from its last checkpoint (weights, optimiser, schedule and the sampling generator) and
ends on the same weights as an uninterrupted run, and a stop request or a cell's time limit
checkpoints it like any cell.

Layout: ``<run>/diffusion/<key>/{model.pt, model.pt.sha256, checkpoint.pt, result.json}``.
Our choices (ConfiG does not publish its recipe): no EMA, AdamW with linear warm-up then cosine
decay, linear betas over 1000 steps, uniform timesteps, epsilon prediction.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.artifacts import file_lock, load_checked, load_checkpoint, save_checked
from kdbench.cells import TrainRecipe
from kdbench.diffusion.model import DiffusionModel, alphas_cumprod_from, diffusers_module, tiny_unet
from kdbench.engine.hooks import Hook
from kdbench.engine.train import (
    Checkpoint,
    LossFn,
    LRSchedule,
    Stage,
    StepInput,
    StopRequested,
    Trainer,
    TrainSetup,
    clean,
    clear_stop,
    request_stop,
)
from kdbench.errors import ConfigError
from kdbench.features import FeatureReader, TapSpec

#: bump when the training code changes what a recipe produces
CODE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """How the default diffusion model is trained (a grid setting: ``model: {steps: ..., ...}``)."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    widths: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = False
    class_conditional: bool = True
    timesteps: int = 1000
    beta_schedule: str = "linear"
    seed: int = 0
    checkpoint_every: int = 250

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> Recipe:
        params = dict(params or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"config augmenter: unknown diffusion recipe key(s) {', '.join(unknown)}; "
                f"known: path, {', '.join(sorted(known))}"
            )
        if "widths" in params:
            params["widths"] = tuple(int(w) for w in params["widths"])
        r = cls(**params)
        if r.steps < 1 or r.batch_size < 1 or r.lr <= 0 or not r.widths or r.timesteps < 2:
            raise ConfigError(f"config augmenter: invalid diffusion recipe {r}")
        if r.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ConfigError(
                f"config augmenter: beta_schedule {r.beta_schedule!r}; "
                "one of linear, scaled_linear, squaredcos_cap_v2"
            )
        return r

    def scheduler_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.timesteps, "beta_schedule": self.beta_schedule}

    def downsample(self) -> int:
        return 2 ** (len(self.widths) - 1)


def data_digest(images: Tensor, labels: Tensor) -> str:
    """SHA-256 of the training images and labels (content-addressed cache key)."""
    h = hashlib.sha256()
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_key(recipe: Recipe, digest: str, num_classes: int, source: dict[str, Any] | None = None) -> str:
    """The cache key: recipe, data digest, classes, code version and, when the model trains on
    data of its own (``model.dataset``), that data's spec and fingerprint (``source``)."""
    spec: dict[str, Any] = {
        "recipe": asdict(recipe),
        "data": digest,
        "classes": num_classes,
        "code": CODE_VERSION,
    }
    if source is not None:  # absent: the keys models trained on a cell's own split always had
        spec["source"] = source
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(recipe: Recipe, image_size: int, channels: int, num_classes: int) -> DiffusionModel:
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
        torch.manual_seed(recipe.seed)
        unet = tiny_unet(
            image_size,
            channels,
            num_classes if recipe.class_conditional else None,
            widths=recipe.widths,
            layers_per_block=recipe.layers_per_block,
            attention=recipe.attention,
        )
    return DiffusionModel(
        unet=unet,
        alphas_cumprod=alphas_cumprod_from(recipe.scheduler_config()),
        source={"recipe": asdict(recipe)},
    )


def _check_images(recipe: Recipe, images: Tensor) -> None:
    _, _, h, w = images.shape
    if h != w:
        raise ConfigError(f"config augmenter: the default diffusion model needs square images, got {h}x{w}")
    if h % recipe.downsample():
        raise ConfigError(
            f"config augmenter: a UNet with {len(recipe.widths)} levels cannot take {h}x{w} images "
            f"(size must be divisible by {recipe.downsample()}); set fewer `widths`"
        )


def _lr_factor(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    span = max(recipe.steps - recipe.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / span))


class NoisedSamples:
    """The data of the DDPM stage: each epoch is one batch drawn with replacement, and each of its
    samples comes with a uniform timestep ``t`` and Gaussian ``noise`` (its ``meta``).

    All three are drawn from the trainer's data generator, indices then timesteps then noise, so
    a checkpoint's generator state fixes every later batch (and the weights are those of the
    plain loop this stage replaced).
    """

    def __init__(self, images: Tensor, labels: Tensor, recipe: Recipe):
        self.images, self.labels, self.recipe = images, labels, recipe
        self.drawn: dict[str, Tensor] = {}

    def iterate(
        self, generator: torch.Generator, sampler: str = "shuffle", skip_batches: int = 0
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One batch of (images, labels, indices); drawn but not yielded when it is skipped."""
        r, (_, c, h, w) = self.recipe, self.images.shape
        idx = torch.randint(len(self.images), (r.batch_size,), generator=generator)
        t = torch.randint(r.timesteps, (r.batch_size,), generator=generator)
        noise = torch.randn((r.batch_size, c, h, w), generator=generator)
        self.drawn = {"t": t, "noise": noise}
        if not skip_batches:
            yield self.images[idx], self.labels[idx], idx

    def meta_at(self, positions: Tensor) -> dict[str, Tensor]:
        """The timesteps and noise of the batch just drawn (``positions`` are its indices)."""
        return self.drawn


def noise_prediction_loss(unet: nn.Module, alphas_cumprod: Tensor, conditional: bool) -> LossFn:
    """DDPM's loss: the MSE between the noise added at timestep ``t`` and the UNet's prediction
    of it from the noised image (and, class-conditional, the label)."""

    def loss(inp: StepInput) -> dict[str, Tensor]:
        t, noise = inp.meta["t"], inp.meta["noise"]
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * inp.x + (1 - a).sqrt() * noise
        pred = unet(x_t, t, class_labels=inp.y if conditional else None).sample
        return {"noise": F.mse_loss(pred, noise)}

    return loss


class _WarmupCosine(LRSchedule):
    """The recipe's lr: linear warm-up then cosine decay, stepped after every step (= epoch)."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe

    def attach(self, trainer: Trainer) -> None:
        self.sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, lambda s: _lr_factor(self.recipe, s))


class _Record(Hook):
    """Training wall time (summed over resumed runs) and the last step's loss, checkpointed."""

    name = "diffusion"

    def __init__(self) -> None:
        self.t0, self.loss = time.perf_counter(), float("nan")

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        self.loss = row["loss_noise"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed(), "loss": self.loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.t0, self.loss = time.perf_counter() - state["elapsed"], state["loss"]


class _StopAfter(Hook):
    """Asks the trainer to stop after ``steps`` steps, as SIGTERM does (tests: a killed run)."""

    name = "stop_after"

    def __init__(self, steps: int):
        self.steps = steps

    def after_epoch(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        if epoch + 1 == self.steps < trainer.stage.epochs:
            request_stop()


def _trainer(
    recipe: Recipe,
    model: DiffusionModel,
    samples: NoisedSamples,
    device: torch.device,
    checkpoint: Path,
    hooks: list[Hook],
) -> Trainer:
    """The engine's trainer on one stage of ``recipe.steps`` one-step epochs, AdamW without
    weight decay, the recipe's lr schedule, checkpoints every ``recipe.checkpoint_every`` steps."""
    unet = model.unet
    setup = TrainSetup(
        student=unet,
        student_reader=FeatureReader(unet, TapSpec(), ()),  # no taps: the loss calls the UNet
        recipe=TrainRecipe(
            epochs=recipe.steps,
            batch_size=recipe.batch_size,
            optimizer="adamw",
            lr=recipe.lr,
            weight_decay=0.0,
            schedule="constant",
            checkpoint_every=recipe.checkpoint_every,
        ),
        train_data=samples,  # duck-typed: iterate and meta_at are all the trainer reads
        device=device,
        seed=recipe.seed,
        augment=clean,
    )
    loss = noise_prediction_loss(unet, model.alphas_cumprod.to(device), recipe.class_conditional)
    stage = Stage("diffusion", recipe.steps, list(unet.parameters()), loss, setup.recipe, recipe.seed)
    ckpt = Checkpoint(setup, checkpoint, recipe.checkpoint_every)
    return Trainer(setup, stage, [_WarmupCosine(recipe), *hooks, ckpt])


def _resume(trainer: Trainer, path: Path) -> int:
    """Load the checkpoint at ``path`` into ``trainer``; the steps it covers (0: none).

    A checkpoint of the loop that preceded the trainer (no ``trainer`` entry) is not resumed:
    training restarts and, the arithmetic being the same, ends on the same weights.
    """
    state = load_checkpoint(path, map_location="cpu")  # load_state_dict moves it to the device
    if state is None or "trainer" not in state:
        return 0
    trainer.setup.student.load_state_dict(state["student"])
    trainer.load_state_dict(state["trainer"])
    return int(state["epoch"])


def train_unet(
    recipe: Recipe,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    workdir: Path,
    device: torch.device | str = "cpu",
    stop_after: int | None = None,
) -> DiffusionModel | None:
    """Train the recipe's UNet on ``images`` in [-1, 1] ``[N, C, H, W]`` with the engine's
    :class:`~kdbench.engine.train.Trainer`; resumes from ``workdir/checkpoint.pt``.

    A stop request (SIGTERM) or a cell's time limit checkpoints and raises as for any cell.
    ``stop_after`` requests that stop after that many steps and returns None: it is how tests
    simulate a killed training."""
    _check_images(recipe, images)
    workdir.mkdir(parents=True, exist_ok=True)
    _, c, h, _ = images.shape
    model = _build(recipe, h, c, num_classes)
    model.unet.to(device)
    record = _Record()
    hooks: list[Hook] = [record] + ([] if stop_after is None else [_StopAfter(stop_after)])
    samples = NoisedSamples(images, labels, recipe)
    trainer = _trainer(recipe, model, samples, torch.device(device), workdir / "checkpoint.pt", hooks)
    start = _resume(trainer, workdir / "checkpoint.pt")
    try:
        trainer.run(start)
    except StopRequested:
        if stop_after is None:
            raise
        clear_stop()
        return None
    model.source["train_s"] = record.elapsed()
    model.source["final_loss"] = record.loss
    return model.to(device)


def obtain_trained(
    recipe: Recipe,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    run_dir: Path,
    device: torch.device | str = "cpu",
    source: dict[str, Any] | None = None,
    seen: dict[str, Any] | None = None,
) -> tuple[DiffusionModel, dict[str, Any]]:
    """The recipe's model for these images: from ``run_dir/diffusion/`` or trained now (once).

    ``source`` (the dataset spec and fingerprint of data other than the cell's split) joins the
    key; ``seen`` (what the images are: dataset, count, group counts) joins the record only.
    Returns the model (frozen, on ``device``) and its record (key, train_s, trained_here).
    """
    key = model_key(recipe, data_digest(images, labels), num_classes, source)
    work = Path(run_dir) / "diffusion" / key
    weights = work / "model.pt"
    trained_here = False
    with file_lock(Path(run_dir) / "diffusion" / f"{key}.lock"):
        if not weights.exists():
            model = train_unet(recipe, images, labels, num_classes, work, device)
            assert model is not None
            record = {
                "key": key,
                "recipe": asdict(recipe),
                "num_classes": num_classes,
                "image_shape": list(images.shape[1:]),
                "train_s": model.source["train_s"],
                "final_loss": model.source["final_loss"],
                "device": str(device),
                **({"source": source} if source is not None else {}),
                **({"seen": seen} if seen is not None else {}),
            }
            save_checked({"unet": model.unet.state_dict(), "record": record}, weights)
            (work / "result.json").write_text(json.dumps(record, indent=1, default=str))
            (work / "checkpoint.pt").unlink(missing_ok=True)
            trained_here = True
    saved = load_checked(weights, rebuild_hint=f"delete {work} to train the diffusion model again")
    record = dict(saved["record"])
    _, c, h, _ = images.shape
    model = _build(recipe, h, c, num_classes)
    model.unet.load_state_dict(saved["unet"])
    model.source.update(key=key, train_s=record["train_s"])
    return model.to(device), {**record, "trained_here": trained_here}


__all__ = ["Recipe", "obtain_trained", "train_unet", "data_digest", "model_key", "diffusers_module"]
