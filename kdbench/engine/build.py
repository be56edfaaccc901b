"""Building plugins from resolved cell dicts: datasets, models, augmenters, devices."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from kdbench import registry
from kdbench.errors import ConfigError
from kdbench.features import TapSpec
from kdbench.models._common import taps_from_params


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device: {e}") from None


def build_dataset(ref: dict[str, Any]) -> Any:
    cls = registry.load("datasets", ref["name"])
    return cls(**ref.get("params", {}))


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(ref: dict[str, Any], num_classes: int, in_channels: int) -> tuple[nn.Module, TapSpec]:
    """A model from its plugin, plus where its features live (``taps`` param or discovered)."""
    factory = registry.load("models", ref["name"])
    params = dict(ref.get("params", {}))
    taps = params.pop("taps", None)
    if _accepts(factory, "in_channels"):
        params["in_channels"] = in_channels
    elif in_channels != 3:
        raise ConfigError(
            f"model {ref['name']!r} takes no in_channels and the data has {in_channels} channels"
        )
    model = factory(num_classes=num_classes, **params)
    spec = taps_from_params(model, taps)
    return model, spec


def build_augmenter(ref: dict[str, Any], split: Any = None) -> Any:
    """An augmenter; ``mean``/``std`` it accepts but the grid left unset come from the data."""
    cls = registry.load("augmenters", ref["name"])
    params = dict(ref.get("params", {}))
    for stat in ("mean", "std"):
        if params.get(stat) is None and _accepts(cls, stat) and hasattr(split, stat):
            params[stat] = list(getattr(split, stat))
    return cls(**params)
