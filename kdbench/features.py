"""Reading intermediate features out of any ``nn.Module`` with forward hooks.

A model never has to return special tuples: a :class:`TapSpec` names the modules whose
outputs are the model's *stages*, the modules whose *inputs* are the stages' pre-activations,
and the final classifier (whose input is the pooled, penultimate feature). The CIFAR zoo
sets ``model.kd_taps``; any other model gets one discovered by :func:`discover_taps` or
written in the grid by module path.

Conventions follow RepDistiller's ``feat`` list so that method code reads like the
references: ``stages[0]`` is the stem output, ``stages[1:]`` the outputs of the residual
stages (shallow to deep), and ``pooled`` is RepDistiller's ``feat[-1]``. ``blocks`` are finer:
the stem and every residual / conv block's output (``features: blocks``), for methods that
relate every layer (ckakd); a model without block taps offers its stages as blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdbench.errors import ConfigError

TAP_NAMES = ("logits", "stages", "preact", "pooled", "blocks")


@dataclass(frozen=True)
class TapSpec:
    """Where a model's features live, by module path (``model.get_submodule`` syntax)."""

    stages: tuple[str, ...] = ()
    #: module paths whose *input* is the pre-activation of the matching stage ("" = none)
    preact: tuple[str, ...] = ()
    #: the final linear layer; its input is the pooled feature
    classifier: str = ""
    #: every block's output, shallow to deep (stem first); empty = the stages serve as blocks
    blocks: tuple[str, ...] = ()

    def provides(self, tap: str) -> bool:
        """Whether this spec locates the tap ``tap`` (logits always)."""
        return {
            "logits": True,
            "stages": bool(self.stages),
            "preact": any(self.preact),
            "pooled": bool(self.classifier),
            "blocks": bool(self.blocks),
        }[tap]

    def to_dict(self) -> dict:
        d = {"stages": list(self.stages), "preact": list(self.preact), "classifier": self.classifier}
        return {**d, "blocks": list(self.blocks)} if self.blocks else d


@dataclass
class Features:
    """What one forward pass of a model exposes to a method."""

    logits: Tensor | None = None
    stages: list[Tensor] = field(default_factory=list)
    preact: list[Tensor] = field(default_factory=list)
    pooled: Tensor | None = None
    blocks: list[Tensor] = field(default_factory=list)
    #: values a method derives from this forward pass and reuses (e.g. SimKD's projection)
    cache: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def detach(self) -> Features:
        return Features(
            logits=None if self.logits is None else self.logits.detach(),
            stages=[f.detach() for f in self.stages],
            preact=[f.detach() for f in self.preact],
            pooled=None if self.pooled is None else self.pooled.detach(),
            blocks=[f.detach() for f in self.blocks],
        )

    def shapes(self) -> dict:
        """Per-sample shapes (batch dimension dropped) of every tap that was read
        (``blocks`` only when they were)."""
        blocks = {"blocks": [tuple(f.shape[1:]) for f in self.blocks]} if self.blocks else {}
        return {
            "logits": None if self.logits is None else tuple(self.logits.shape[1:]),
            "stages": [tuple(f.shape[1:]) for f in self.stages],
            "preact": [tuple(f.shape[1:]) for f in self.preact],
            "pooled": None if self.pooled is None else tuple(self.pooled.shape[1:]),
        } | blocks


def _last_linear(model: nn.Module) -> str:
    name = ""
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def discover_taps(model: nn.Module) -> TapSpec:
    """The model's own ``kd_taps`` if it has one, else a best guess for common families."""
    spec = getattr(model, "kd_taps", None)
    if isinstance(spec, TapSpec):
        return spec
    names = dict(model.named_modules())
    # torchvision ResNet / timm ResNet family
    if all(f"layer{i}" in names for i in range(1, 5)):
        stem = "relu" if "relu" in names else ""
        stages = tuple(([stem] if stem else []) + [f"layer{i}" for i in range(1, 5)])
        return TapSpec(stages=stages, classifier=_last_linear(model))
    # torchvision MobileNet / VGG / EfficientNet: a `features` Sequential
    feats = names.get("features")
    if isinstance(feats, nn.Sequential):
        stages = tuple(f"features.{i}" for i in range(len(feats)))
        return TapSpec(stages=stages, classifier=_last_linear(model))
    return TapSpec(classifier=_last_linear(model))


class FeatureReader:
    """Registers hooks once; ``read(x)`` runs the model and returns :class:`Features`.

    Only the taps asked for are recorded, so a logit-only method pays nothing for hooks.
    """

    def __init__(self, model: nn.Module, spec: TapSpec, wanted: Iterable[str]):
        wanted = set(wanted)
        unknown = wanted - set(TAP_NAMES)
        if unknown:
            raise ConfigError(f"unknown taps {sorted(unknown)}; known taps: {', '.join(TAP_NAMES)}")
        self.model = model
        self.spec = spec
        self.wanted = wanted
        self._stages: dict[int, Tensor] = {}
        self._preact: dict[int, Tensor] = {}
        self._pooled: Tensor | None = None
        self._blocks: dict[int, Tensor] = {}
        self._handles: list = []
        if "stages" in wanted:
            if not spec.stages:
                raise ConfigError(
                    f"{type(model).__name__} has no stage taps; name them in the grid "
                    "(model params `taps: {stages: [module paths], classifier: path}`)"
                )
            for i, path in enumerate(spec.stages):
                self._hook_output(path, i, self._stages)
        if "preact" in wanted:
            if not spec.preact or not any(spec.preact):
                raise ConfigError(f"{type(model).__name__} exposes no pre-activation taps")
            for i, path in enumerate(spec.preact):
                if path:
                    self._hook_input(path, i, self._preact)
        if "blocks" in wanted:
            paths = spec.blocks or spec.stages
            if not paths:
                raise ConfigError(
                    f"{type(model).__name__} has no block or stage taps; name them in the grid "
                    "(model params `taps: {stages: [module paths], classifier: path}`)"
                )
            for i, path in enumerate(paths):
                self._hook_output(path, i, self._blocks)
        if "pooled" in wanted:
            if not spec.classifier:
                raise ConfigError(
                    f"{type(model).__name__} has no classifier tap to read pooled features from"
                )
            mod = self._module(spec.classifier)
            self._handles.append(mod.register_forward_pre_hook(self._pooled_hook))

    def _module(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError as e:
            raise ConfigError(f"tap module {path!r} not found in {type(self.model).__name__}") from e

    def _hook_output(self, path: str, i: int, store: dict[int, Tensor]) -> None:
        def hook(_m, _inp, out):
            store[i] = out

        self._handles.append(self._module(path).register_forward_hook(hook))

    def _hook_input(self, path: str, i: int, store: dict[int, Tensor]) -> None:
        def hook(_m, inp):
            store[i] = inp[0]

        self._handles.append(self._module(path).register_forward_pre_hook(hook))

    def _pooled_hook(self, _m, inp):
        self._pooled = torch.flatten(inp[0], 1)

    def read(self, x: Tensor) -> Features:
        self._stages.clear()
        self._preact.clear()
        self._blocks.clear()
        self._pooled = None
        logits = self.model(x)
        if not isinstance(logits, Tensor):  # e.g. Hugging Face outputs
            logits = logits.logits if hasattr(logits, "logits") else logits[0]
        feats = Features(logits=logits)
        if "stages" in self.wanted:
            feats.stages = [self._stages[i] for i in sorted(self._stages)]
        if "preact" in self.wanted:
            feats.preact = [self._preact[i] for i in sorted(self._preact)]
        if "pooled" in self.wanted:
            feats.pooled = self._pooled
        if "blocks" in self.wanted:
            feats.blocks = [self._blocks[i] for i in sorted(self._blocks)]
        return feats

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def probe_features(model: nn.Module, spec: TapSpec, x: Tensor) -> Features:
    """Detached features of every tap ``spec`` provides, read in eval mode (the set-up probe
    that gives methods their feature shapes and probe features); the model's mode is kept."""
    wanted = [name for name in TAP_NAMES if name == "logits" or spec.provides(name)]
    reader = FeatureReader(model, spec, wanted)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return reader.read(x).detach()
    finally:
        model.train(was)
        reader.close()
