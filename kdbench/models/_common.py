"""Helpers shared by the model files: parameter counting and taps written in a grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kdbench.errors import ConfigError
from kdbench.features import TapSpec, discover_taps

_TAP_KEYS = ("stages", "preact", "classifier")


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (what the KD papers' tables report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def taps_from_params(model: nn.Module, taps: Mapping[str, Any] | None) -> TapSpec:
    """A :class:`TapSpec` from a grid's ``taps: {stages, preact, classifier}``, else a discovered one.

    Every module path is checked against ``model`` so a typo fails before training starts.
    """
    if taps is None:
        return discover_taps(model)
    if not isinstance(taps, Mapping):
        raise ConfigError(f"taps: expected a mapping with keys {', '.join(_TAP_KEYS)}, got {taps!r}")
    unknown = sorted(set(taps) - set(_TAP_KEYS))
    if unknown:
        raise ConfigError(f"taps: unknown keys {unknown}; allowed keys: {', '.join(_TAP_KEYS)}")
    stages = tuple(str(p) for p in taps.get("stages") or ())
    preact = tuple(str(p) for p in taps.get("preact") or ())
    classifier = str(taps.get("classifier") or "")
    if preact and len(preact) != len(stages):
        raise ConfigError(
            f"taps: preact has {len(preact)} entries but stages has {len(stages)}; "
            'give one preact path per stage ("" for none)'
        )
    names = {n for n, _ in model.named_modules()}
    missing = [p for p in (*stages, *preact, classifier) if p and p not in names]
    if missing:
        raise ConfigError(
            f"taps: no module named {', '.join(repr(m) for m in missing)} in {type(model).__name__}; "
            "list the module paths with `[n for n, _ in model.named_modules()]`",
            problems=[f"taps: no module {m!r}" for m in missing],
        )
    return TapSpec(stages=stages, preact=preact, classifier=classifier)


def block_paths(model: nn.Module, stem: str, groups: Sequence[str]) -> tuple[str, ...]:
    """The ``blocks`` taps of a model built from groups of blocks: the stem's path, then the
    path of every child of each group (an ``nn.Sequential`` of residual / conv blocks), in order."""
    paths = [stem] if stem else []
    for g in groups:
        paths += [f"{g}.{name}" for name, _ in model.get_submodule(g).named_children()]
    return tuple(paths)


def init_fan_out_normal(model: nn.Module, linear_std: float | None = None) -> None:
    """The CIFAR-zoo initialisation (WRN / VGG / MobileNetV2 references): conv weights
    N(0, 2/fan_out), zero biases, BN to identity; Linear weights N(0, linear_std²) when
    ``linear_std`` is given (else left at PyTorch's default), Linear biases zero."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
