"""Models from other libraries: ``torchvision``, ``timm`` and local Hugging Face checkpoints.

Nothing here downloads: weights come from LOCAL files only. Each factory sets ``kd_taps``,
from the grid's ``taps: {stages: [...], preact: [...], classifier: ...}`` (module paths,
checked against the model) or, without it, from :func:`kdbench.features.discover_taps`
(torchvision ResNets and ``features``-style models get stages; every model gets its last
``nn.Linear`` as the classifier, whose input is the pooled feature).

- ``torchvision``: any classification model of ``torchvision.models.get_model`` by ``name``;
  ``weights`` is a local state-dict file (``.pt``/``.pth``, or ``.safetensors`` when
  safetensors is installed). A checkpoint whose head has another number of classes loads
  into the body and the head is re-initialised for ``num_classes``.
- ``timm``: ``timm.create_model(name, pretrained=False)``; ``checkpoint_path`` as above
  (``pip install 'kdbench[timm]'``).
- ``hf``: a local Hugging Face image-classification checkpoint directory (``config.json`` +
  weights, e.g. written by ``save_pretrained``), loaded with
  ``AutoModelForImageClassification.from_pretrained(path, local_files_only=True)`` and wrapped
  so ``forward`` returns the logits tensor (``pip install 'kdbench[hf]'``).

With ``in_channels`` ≠ 3 the first convolution of a torchvision/timm model is rebuilt for that
many channels (pretrained RGB filters are summed over colour and spread evenly); an ``hf``
model given 1-channel images repeats the channel to RGB.

The ViT → MobileNetV2 distillation of the Hugging Face Transformers knowledge-distillation
guide, as a grid (the teacher directory holds a fine-tuned ViT, e.g. a local copy of
``merve/beans-vit-224``; images must reach it at its training resolution)::

    pairs:
      - teacher: {hf: {path: /data/ckpt/beans-vit-224, input_size: 224}}
        student: {torchvision: {name: mobilenet_v2}}
    methods: [kd]

``hf:/data/ckpt/beans-vit-224`` and ``torchvision:mobilenet_v2`` are the short forms. For a
ViT the discovered classifier is ``model.classifier`` (the last ``nn.Linear``), so the pooled
feature is the final [CLS] embedding; logit methods (KD, DKD, DIST, …) and pooled-feature
methods (RKD, PKT, SP, CRD, …) work unchanged, stage methods need ``taps: {stages: [...]}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbench.errors import ConfigError, PluginError
from kdbench.models._common import taps_from_params

# --------------------------------------------------------------------------- checkpoints


def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"{what}: {str(p)!r} is not a file; give the path of a local checkpoint "
            "(kdbench never downloads weights)"
        )
    return p


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a local file: a plain one, ``{"state_dict"|"model": ...}``, or safetensors."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PluginError(f"{path} is a safetensors file: pip install safetensors") from None
        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"cannot read checkpoint {str(path)!r}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint {str(path)!r} holds no state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _head_path(model: nn.Module) -> str:
    """The classification head: the last ``nn.Linear`` (else the last conv, e.g. SqueezeNet)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else ""


def _first_conv_path(model: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), "")


def _spread_rgb(weight: Tensor, in_channels: int) -> Tensor:
    """RGB filters → ``in_channels`` filters giving the same response to a grey image."""
    return weight.sum(1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``; a head of another size, or an RGB stem, is adapted.

    Any other difference (missing, unexpected or mis-shaped keys) is an error naming them.
    """
    own = model.state_dict()
    head, stem = _head_path(model), _first_conv_path(model)

    def in_head(key: str) -> bool:
        return bool(head) and key.startswith(head + ".")

    keep: dict[str, Tensor] = {}
    problems: list[str] = []
    new_head = False
    for k, v in state.items():
        if k not in own:
            problems.append(f"unexpected key {k}")
        elif v.shape == own[k].shape:
            keep[k] = v
        elif in_head(k):
            new_head = True  # another number of classes: the head stays freshly initialised
        elif k == f"{stem}.weight" and v.dim() == 4 and v.shape[0] == own[k].shape[0] and v.shape[1] == 3:
            keep[k] = _spread_rgb(v, own[k].shape[1])
        else:
            problems.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    # BatchNorm fills in num_batches_tracked itself for checkpoints saved before it existed
    problems += [
        f"missing key {k}" for k in sorted(own.keys() - state.keys()) if not k.endswith("num_batches_tracked")
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … ({len(problems)} in all)" if len(problems) > 6 else "")
        raise ConfigError(f"checkpoint {source!r} does not fit {type(model).__name__}: {shown}", problems)
    if new_head:
        keep = {k: v for k, v in keep.items() if not in_head(k)}
    model.load_state_dict(keep, strict=False)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    path = _first_conv_path(model)
    if not path:
        raise ConfigError(f"{type(model).__name__} has no convolution to adapt to in_channels={in_channels}")
    old = model.get_submodule(path)
    if old.in_channels == in_channels:
        return
    if old.groups != 1:
        raise ConfigError(
            f"{type(model).__name__}: cannot adapt a grouped first convolution to in_channels={in_channels}"
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    model.set_submodule(path, new)


# --------------------------------------------------------------------------- torchvision


def torchvision_model(
    num_classes: int = 100,
    in_channels: int = 3,
    *,
    name: str,
    weights: str | None = None,
    taps: dict | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Any torchvision classification model by name; ``weights`` is a local state-dict file."""
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
        raise ConfigError(f"torchvision has no classification model {name!r}{hint}")
    path = _existing_file(weights, "torchvision weights") if weights else None
    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"torchvision model {name!r}: {e}") from None
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    if path is not None:
        load_into(model, read_state_dict(path), str(path))
    model.kd_taps = taps_from_params(model, taps)
    return model


def _build_on_meta(what: str, build: Any) -> None:
    """Build a model on the meta device (no memory, no weights): the library checks its arguments."""
    import warnings

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build()
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"{what}: {e}") from None
    except (NotImplementedError, RuntimeError) as e:
        if "meta" in str(e).lower():
            return  # the model cannot be built on the meta device; it is checked when it is built
        raise ConfigError(f"{what}: {e}") from None


def check_torchvision_params(params: dict[str, Any]) -> None:
    """Config-time check (``check_params`` hook): the name exists, the weights file too, and
    torchvision's builder accepts the other parameters (built on the meta device)."""
    import torchvision.models as tvm

    name = params.get("name")
    known = tvm.list_models(module=tvm)
    if name not in known:
        import difflib

        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
        raise ConfigError(f"torchvision has no classification model {name!r}{hint}")
    if params.get("weights"):
        _existing_file(params["weights"], "torchvision weights")
    kwargs = {k: v for k, v in params.items() if k not in ("name", "weights", "taps")}
    _build_on_meta(
        f"torchvision model {name!r}", lambda: tvm.get_model(name, weights=None, num_classes=10, **kwargs)
    )


torchvision_model.check_params = check_torchvision_params  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- timm


def timm_model(
    num_classes: int = 100,
    in_channels: int = 3,
    *,
    name: str,
    checkpoint_path: str | None = None,
    taps: dict | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model by name (never ``pretrained=True``); ``checkpoint_path`` is a local file."""
    try:
        import timm
    except ImportError:
        raise PluginError("the `timm` model source needs timm: pip install 'kdbench[timm]'") from None
    path = _existing_file(checkpoint_path, "timm checkpoint_path") if checkpoint_path else None
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except RuntimeError as e:  # timm's "Unknown model"
        raise ConfigError(f"timm model {name!r}: {e}") from None
    if path is not None:
        load_into(model, read_state_dict(path), str(path))
    model.kd_taps = taps_from_params(model, taps)
    return model


def check_timm_params(params: dict[str, Any]) -> None:
    """Config-time check: timm is installed, knows the name, and accepts the other parameters."""
    try:
        import timm
    except ImportError:
        raise ConfigError("the `timm` model source needs timm: pip install 'kdbench[timm]'") from None
    name = params.get("name")
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"timm has no model {name!r}{hint}")
    if params.get("checkpoint_path"):
        _existing_file(params["checkpoint_path"], "timm checkpoint_path")
    kwargs = {k: v for k, v in params.items() if k not in ("name", "checkpoint_path", "taps")}
    _build_on_meta(
        f"timm model {name!r}", lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    )


timm_model.check_params = check_timm_params  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Hugging Face


class HFImageClassifier(nn.Module):
    """A Hugging Face image classifier whose ``forward(x)`` returns the logits tensor."""

    def __init__(self, model: nn.Module, in_channels: int = 3, input_size: int | None = None):
        super().__init__()
        self.model = model
        self.in_channels = in_channels
        self.expected_channels = int(getattr(model.config, "num_channels", 3))
        self.input_size = input_size

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1 and self.expected_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.model(pixel_values=x).logits


def hf_model(
    num_classes: int = 100,
    in_channels: int = 3,
    *,
    path: str,
    input_size: int | None = None,
    taps: dict | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A local Hugging Face image-classification checkpoint directory; ``input_size`` resizes inputs."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"hf: {str(root)!r} is not a directory; give a local Hugging Face checkpoint "
            "directory (config.json + weights, e.g. written by save_pretrained); "
            "kdbench never downloads models"
        )
    try:
        from transformers import AutoConfig, AutoModelForImageClassification
    except ImportError:
        raise PluginError("the `hf` model source needs transformers: pip install 'kdbench[hf]'") from None
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        if config.num_labels != num_classes:
            # a new head for num_classes; the body keeps the checkpoint's weights
            kwargs = {"num_labels": num_classes, "ignore_mismatched_sizes": True, **kwargs}
        model = AutoModelForImageClassification.from_pretrained(str(root), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"hf: cannot load an image classifier from {str(root)!r}: {e}") from None
    expected = int(getattr(model.config, "num_channels", 3))
    if in_channels != expected and not (in_channels == 1 and expected == 3):
        raise ConfigError(
            f"hf: the checkpoint takes {expected}-channel images, the dataset has {in_channels}"
        )
    wrapped = HFImageClassifier(model, in_channels, input_size)
    wrapped.kd_taps = taps_from_params(wrapped, taps)
    return wrapped


#: keyword arguments of ``from_pretrained`` itself that are not fields of a model config
HF_LOAD_KWARGS = {
    "attn_implementation",
    "device_map",
    "dtype",
    "ignore_mismatched_sizes",
    "low_cpu_mem_usage",
    "output_loading_info",
    "revision",
    "subfolder",
    "torch_dtype",
    "use_safetensors",
    "variant",
}


def check_hf_params(params: dict[str, Any]) -> None:
    """Config-time check: a local checkpoint directory whose config transformers reads, and
    every other parameter either a field of that config or an argument of ``from_pretrained``."""
    root = Path(str(params.get("path"))).expanduser()
    if not (root / "config.json").is_file():
        raise ConfigError(
            f"hf: {str(root)!r} is not a Hugging Face checkpoint directory (no config.json); give a "
            "local directory written by save_pretrained (kdbench never downloads models)"
        )
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("the `hf` model source needs transformers: pip install 'kdbench[hf]'") from None
    kwargs = {k: v for k, v in params.items() if k not in ("path", "input_size", "taps")}
    try:
        _, unused = AutoConfig.from_pretrained(
            str(root), local_files_only=True, return_unused_kwargs=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"hf: cannot read the config in {str(root)!r}: {e}") from None
    unknown = sorted(set(unused) - HF_LOAD_KWARGS)
    if unknown:
        raise ConfigError(
            f"hf: {', '.join(unknown)}: neither a field of the checkpoint's config nor an argument "
            "of from_pretrained"
        )


hf_model.check_params = check_hf_params  # type: ignore[attr-defined]
