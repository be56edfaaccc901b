"""The default diffusion model: a small class-conditional UNet2DModel trained with DDPM's noise
prediction loss on the student's own training split, cached in the run directory.

Like teachers, it is a shared artefact: keyed by a hash of the recipe and the training images,
trained once under a file lock by whichever cell needs it first, saved with a checksum
(:mod:`kdbench.artifacts`), and resumable: a killed training restarts from its last checkpoint
(weights, optimiser and the sampling generator), giving the same weights as an uninterrupted run.

Layout: ``<run>/diffusion/<key>/{model.pt, model.pt.sha256, checkpoint.pt, result.json}``.
Our choices (ConfiG does not publish its recipe): no EMA, AdamW with linear warm-up then cosine
decay, linear betas over 1000 steps, uniform timesteps, epsilon prediction.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.artifacts import file_lock, load_checked, load_checkpoint, save_atomic, save_checked
from kdbench.diffusion.model import DiffusionModel, alphas_cumprod_from, diffusers_module, tiny_unet
from kdbench.errors import ConfigError

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


def model_key(recipe: Recipe, digest: str, num_classes: int) -> str:
    spec = {"recipe": asdict(recipe), "data": digest, "classes": num_classes, "code": CODE_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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


def _lr_factor(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    span = max(recipe.steps - recipe.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / span))


def train_unet(
    recipe: Recipe,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    workdir: Path,
    device: torch.device | str = "cpu",
    stop_after: int | None = None,
) -> DiffusionModel | None:
    """Train the recipe's UNet on ``images`` in [-1, 1] ``[N, C, H, W]``; resumes from
    ``workdir/checkpoint.pt``. ``stop_after`` ends early (after that many steps, checkpoint
    written) and returns None: it is how tests simulate a killed training."""
    n, c, h, w = images.shape
    if h != w:
        raise ConfigError(f"config augmenter: the default diffusion model needs square images, got {h}x{w}")
    if h % recipe.downsample():
        raise ConfigError(
            f"config augmenter: a UNet with {len(recipe.widths)} levels cannot take {h}x{w} images "
            f"(size must be divisible by {recipe.downsample()}); set fewer `widths`"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    model = _build(recipe, h, c, num_classes)
    unet = model.unet.to(device).train()
    ac = model.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(recipe, s))
    gen = torch.Generator().manual_seed(recipe.seed)
    ckpt_path = workdir / "checkpoint.pt"
    step, elapsed, last_loss = 0, 0.0, float("nan")
    state = load_checkpoint(ckpt_path, map_location=device)
    if state is not None:
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, elapsed, last_loss = state["step"], state["elapsed"], state["loss"]
    t0 = time.perf_counter() - elapsed
    while step < recipe.steps:
        idx = torch.randint(n, (recipe.batch_size,), generator=gen)
        t = torch.randint(recipe.timesteps, (recipe.batch_size,), generator=gen)
        noise = torch.randn((recipe.batch_size, c, h, w), generator=gen)
        x0, y, t, noise = images[idx].to(device), labels[idx].to(device), t.to(device), noise.to(device)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(x_t, t, class_labels=y if recipe.class_conditional else None).sample
        loss = F.mse_loss(pred, noise)
        last_loss = loss.item()
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"diffusion training loss is {last_loss} at step {step}; lower `lr`")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % recipe.checkpoint_every == 0 or step == stop_after:
            save_atomic(
                {
                    "unet": unet.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "gen": gen.get_state(),
                    "step": step,
                    "elapsed": time.perf_counter() - t0,
                    "loss": last_loss,
                },
                ckpt_path,
            )
        if stop_after is not None and step >= stop_after and step < recipe.steps:
            return None
    model.unet = unet
    model.source["train_s"] = time.perf_counter() - t0
    model.source["final_loss"] = last_loss
    return model.to(device)


def obtain_trained(
    recipe: Recipe,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    run_dir: Path,
    device: torch.device | str = "cpu",
) -> tuple[DiffusionModel, dict[str, Any]]:
    """The recipe's model for these images: from ``run_dir/diffusion/`` or trained now (once).

    Returns the model (frozen, on ``device``) and its record (key, train_s, trained_here).
    """
    key = model_key(recipe, data_digest(images, labels), num_classes)
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
            }
            save_checked({"unet": model.unet.state_dict(), "record": record}, weights)
            (work / "result.json").write_text(json.dumps(record, indent=1))
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
