"""Helpers shared by the model files: parameter counting and taps written in a grid."""

from __future__ import annotations

from collections.abc import Mapping
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
