"""A diffusion model as ConfiG uses it: a diffusers ``UNet2DModel``, its noise schedule, and for
latent models an ``AutoencoderKL``. Images enter and leave in [-1, 1] (diffusers' convention).

Two sources: :func:`tiny_unet` (the small class-conditional UNet kdbench trains itself, see
:mod:`kdbench.diffusion.train`) and :func:`load_local` (a local diffusers directory, loaded with
``from_pretrained(local_files_only=True)``; nothing is downloaded).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdbench.errors import ConfigError, PluginError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def diffusers_module() -> Any:
    """The ``diffusers`` package, or a clear error saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise PluginError(
            "diffusion models need the `diffusers` package: pip install 'kdbench[diffusion]'"
        ) from None
    return diffusers


@dataclass
class DiffusionModel:
    """A UNet, its schedule (``alphas_cumprod``), its prediction type and an optional VAE."""

    unet: nn.Module
    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    vae: nn.Module | None = None
    scaling_factor: float = 1.0
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return getattr(self.unet, "class_embedding", None) is not None

    @property
    def num_class_embeds(self) -> int | None:
        return self.unet.config.num_class_embeds

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> DiffusionModel:
        """Move to ``device``, eval mode, parameters frozen (gradients flow only to inputs)."""
        for m in (self.unet, self.vae):
            if m is not None:
                m.to(device).eval().requires_grad_(False)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def check(self, in_channels: int, image_size: int, num_classes: int) -> None:
        """Raise :class:`ConfigError` unless this model can generate the dataset's images."""
        check_compatible(
            unet_config=dict(self.unet.config),
            vae_config=dict(self.vae.config) if self.vae is not None else None,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            where=self.source.get("path", "the diffusion model"),
        )

    def eps(self, x_t: Tensor, t: int, y: Tensor | None) -> Tensor:
        """The model's noise estimate at integer timestep ``t``, whatever it predicts."""
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        out = self.unet(x_t, tt, class_labels=y if self.conditional else None).sample
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod[t].to(x_t.dtype)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * x_t
        return (x_t - a.sqrt() * out) / (1 - a).sqrt()  # "sample"

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> the UNet's space (the VAE posterior mean, scaled, for latent models)."""
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """The UNet's space -> images in [-1, 1]."""
        if self.vae is None:
            return z
        return self.vae.decode(z / self.scaling_factor).sample


def check_compatible(
    unet_config: dict,
    vae_config: dict | None,
    in_channels: int,
    image_size: int,
    num_classes: int,
    where: str,
) -> None:
    """The checks :meth:`DiffusionModel.check` does, on configs only (no weights loaded)."""
    img_ch = vae_config["in_channels"] if vae_config else unet_config["in_channels"]
    if img_ch != in_channels:
        raise ConfigError(
            f"{where} makes {img_ch}-channel images but the dataset has {in_channels} channels; "
            "use a diffusion model trained on this kind of image (or drop `model.path` to train one)"
        )
    size = image_size
    if vae_config:
        vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        if size % vae_factor:
            raise ConfigError(
                f"{where}: its VAE downsamples by {vae_factor} and cannot take {image_size}x{image_size} "
                f"images; use a size divisible by {vae_factor}"
            )
        size //= vae_factor
    factor = 2 ** (len(unet_config["down_block_types"]) - 1)
    if size % factor:
        raise ConfigError(
            f"{where}: its UNet downsamples by {factor} and cannot take {size}x{size} inputs "
            f"(image size {image_size}); use fewer UNet levels or an image size divisible by {factor}"
        )
    n_embeds = unet_config.get("num_class_embeds")
    if unet_config.get("class_embed_type") is None and n_embeds is not None and n_embeds < num_classes:
        raise ConfigError(
            f"{where} is conditioned on {n_embeds} classes but the dataset has {num_classes}; "
            "use a model trained on these classes"
        )


def tiny_unet(
    image_size: int,
    channels: int,
    num_classes: int | None,
    widths: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = False,
) -> nn.Module:
    """A small ``UNet2DModel``: ``len(widths)`` levels, class-conditional when ``num_classes``."""
    diffusers = diffusers_module()
    groups = math.gcd(*widths, 8)
    return diffusers.UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(widths),
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        norm_num_groups=groups,
        add_attention=attention,
        num_class_embeds=num_classes,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"diffusion model: cannot read {path}: {e}") from None


#: the pipeline components that make a pipeline text-conditional (Stable Diffusion and kin)
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_TEXT_NOT_YET = (
    "text-conditional pipelines (Stable Diffusion) are not supported yet; kdbench takes unconditional "
    "or class-conditional UNet2DModel pipelines, optionally with an AutoencoderKL `vae`"
)


def inspect_local(path: str | Path) -> dict[str, Any]:
    """What a local diffusers directory holds, from its JSON files only (no weights read).

    Accepted layouts: a pipeline (``model_index.json`` with a ``UNet2DModel`` ``unet``, a
    ``scheduler`` and optionally an ``AutoencoderKL`` ``vae``), the same folders without
    ``model_index.json``, or a bare ``UNet2DModel`` folder (``config.json``), optionally with
    ``scheduler_config.json`` (else DDPM's default linear schedule, 1000 steps).
    Anything else raises :class:`ConfigError` naming what was found; text-conditional pipelines
    (Stable Diffusion: a text encoder, a ``UNet2DConditionModel``) are not supported yet.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"diffusion model: {str(root)!r} is not a directory; set `model.path` to a local diffusers folder"
        )
    info = _layout(root)
    info["unet"], info["vae"] = _component_configs(root, info)
    sched = info["scheduler"] or {}
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            f"diffusion model {str(root)!r}: prediction_type {prediction!r} is not supported; "
            f"one of {', '.join(PREDICTION_TYPES)}"
        )
    return info


def _layout(root: Path) -> dict[str, Any]:
    """Which of the accepted layouts ``root`` is: the UNet and VAE subfolders and the scheduler."""
    info: dict[str, Any] = {"path": str(root), "unet_sub": None, "scheduler": None, "vae_sub": None}
    index = root / "model_index.json"
    if index.exists() or (root / "unet" / "config.json").exists():
        _check_components(root, _read_json(index) if index.exists() else {})
        info["unet_sub"] = "unet"
        if (root / "scheduler" / "scheduler_config.json").exists():
            info["scheduler"] = _read_json(root / "scheduler" / "scheduler_config.json")
        if (root / "vae" / "config.json").exists():
            info["vae_sub"] = "vae"
    elif (root / "config.json").exists():
        if (root / "scheduler_config.json").exists():
            info["scheduler"] = _read_json(root / "scheduler_config.json")
    else:
        raise ConfigError(
            f"diffusion model: {str(root)!r} holds no diffusers model (no model_index.json, unet/config.json "
            "or config.json); save one with `pipeline.save_pretrained(dir)`"
        )
    return info


def _check_components(root: Path, components: dict[str, Any]) -> None:
    """Refuse a pipeline (``model_index.json``) with components other than unet, scheduler, vae."""
    for name, entry in components.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[1] is None:
            continue
        if name in TEXT_COMPONENTS:
            raise ConfigError(
                f"diffusion model {str(root)!r}: component {name!r} ({entry[1]}): {_TEXT_NOT_YET}"
            )
        if name not in ("unet", "scheduler", "vae"):
            raise ConfigError(
                f"diffusion model {str(root)!r}: component {name!r} ({entry[1]}) is not supported; "
                "kdbench takes unconditional or class-conditional UNet2DModel pipelines, "
                "optionally with an AutoencoderKL `vae`"
            )


def _component_configs(root: Path, info: dict[str, Any]) -> tuple[dict, dict | None]:
    """The UNet's and (if any) the VAE's config, checked to be the supported classes."""
    unet_dir = root / info["unet_sub"] if info["unet_sub"] else root
    if not (unet_dir / "config.json").exists():
        raise ConfigError(f"diffusion model {str(root)!r}: {unet_dir / 'config.json'} is missing")
    unet_cfg = _read_json(unet_dir / "config.json")
    kind = unet_cfg.get("_class_name")
    if kind == "UNet2DConditionModel":
        raise ConfigError(f"diffusion model {str(root)!r}: its UNet is a {kind!r}: {_TEXT_NOT_YET}")
    if kind != "UNet2DModel":
        raise ConfigError(
            f"diffusion model {str(root)!r}: its UNet is a {kind!r}; kdbench supports "
            "UNet2DModel (unconditional or class-conditional), e.g. DDPM/DDIM pipelines"
        )
    vae_cfg = None
    if info["vae_sub"]:
        vae_cfg = _read_json(root / "vae" / "config.json")
        if vae_cfg.get("_class_name") != "AutoencoderKL":
            raise ConfigError(
                f"diffusion model {str(root)!r}: its VAE is a {vae_cfg.get('_class_name')!r}; "
                "kdbench supports AutoencoderKL latents"
            )
    return unet_cfg, vae_cfg


def alphas_cumprod_from(scheduler_config: dict | None) -> Tensor:
    """The cumulative alphas of a scheduler config (any diffusers scheduler with betas)."""
    diffusers = diffusers_module()
    cfg = {k: v for k, v in (scheduler_config or {}).items() if not k.startswith("_")}
    sched = diffusers.DDPMScheduler.from_config(cfg)
    return sched.alphas_cumprod.float().clone()


def load_local(path: str | Path) -> DiffusionModel:
    """Load a local diffusers directory (see :func:`inspect_local`), on the CPU, frozen."""
    info = inspect_local(path)
    diffusers = diffusers_module()
    kw: dict[str, Any] = {"local_files_only": True, "low_cpu_mem_usage": False}
    try:
        unet = diffusers.UNet2DModel.from_pretrained(info["path"], subfolder=info["unet_sub"], **kw)
        vae = None
        if info["vae_sub"]:
            vae = diffusers.AutoencoderKL.from_pretrained(info["path"], subfolder="vae", **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"diffusion model {info['path']!r} cannot be loaded: {e}") from None
    sched = info["scheduler"] or {}
    model = DiffusionModel(
        unet=unet,
        alphas_cumprod=alphas_cumprod_from(sched),
        prediction_type=sched.get("prediction_type", "epsilon"),
        vae=vae,
        scaling_factor=float(vae.config.scaling_factor) if vae is not None else 1.0,
        source={"path": info["path"]},
    )
    return model.to("cpu")
