"""Built-in batch augmenters and their contract.

An augmenter (``kdbench.augmenters`` plugin) is a class built once per run with keyword
parameters, ``cls(**params)`` (the grid validates them against ``__init__``'s signature),
then called on every training batch::

    x_aug = augmenter(x, generator)

``x`` is a normalised float batch ``[B, C, H, W]`` on any device; the result has the same
shape, dtype and device. All randomness comes from ``generator`` (a ``torch.Generator``
on any device), never from the global RNG, so a run is reproducible from its seed and
the augmenter does not disturb other consumers of randomness. Augmenters never modify
``x`` in place: the engine may still need the clean batch (e.g. for the teacher's view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from kdbench.errors import ConfigError


class Augmenter:
    """Base class of batch augmenters: ``__call__(x [B,C,H,W] normalised, generator) -> same shape``."""

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def _rand(generator: torch.Generator, *size: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device``."""
    return torch.rand(size, generator=generator, device=generator.device).to(device)


def _randint(generator: torch.Generator, high: int, *size: int, device: torch.device) -> Tensor:
    """Integers in [0, high) drawn on the generator's device, then moved to ``device``."""
    return torch.randint(high, size, generator=generator, device=generator.device).to(device)


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augmenters take a float batch [B, C, H, W], got {x.dtype} {tuple(x.shape)}")


class Identity(Augmenter):
    """No augmentation: returns the batch unchanged."""

    def __init__(self) -> None:
        pass

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return x


class FlipCrop(Augmenter):
    """Random horizontal flip (p = 0.5) and random crop after zero padding, per sample.

    The standard CIFAR recipe (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``),
    vectorised over the batch. The batch is already normalised, so the zero padding is the
    dataset's mean colour rather than black; this is the usual choice for batch-level
    augmentation and differs from pre-normalisation padding only in the border value.
    Set ``flip: false`` for digits, where a mirrored digit is another glyph.
    """

    def __init__(self, flip: bool = True, padding: int = 4) -> None:
        if padding < 0:
            raise ConfigError(f"flip_crop: padding must be >= 0, got {padding}")
        self.flip = flip
        self.padding = padding

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_batch(x)
        b, _, h, w = x.shape
        # draw every random number up front, in a fixed order, so flip=False/padding=0
        # still consume the same stream: results do not depend on which ops are enabled
        flips = _rand(generator, b, device=x.device) < 0.5
        p = self.padding
        dy = _randint(generator, 2 * p + 1, b, device=x.device)
        dx = _randint(generator, 2 * p + 1, b, device=x.device)
        if self.flip:
            x = torch.where(flips.view(b, 1, 1, 1), x.flip(-1), x)
        if p == 0:
            return x
        padded = F.pad(x, (p, p, p, p))  # zeros
        rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        # advanced indexing on (batch, row, col) of a channels-last view: one gather
        out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2).contiguous()


class RandAugmentView(Augmenter):
    """RandAugment (Cubuk et al., 2020) with torchvision's policy, a fresh draw per sample.

    torchvision's ``v2.RandAugment`` works on images in [0, 1], so each sample is mapped
    there and back:

    - with ``mean``/``std`` (the dataset's normalisation), exactly: ``u = x * std + mean``;
    - without them, by the sample's own min/max (one affine map per sample, shared by the
      channels, so colours keep their relations). Geometric ops are then exact; colour ops
      (brightness, contrast, solarize...) see a contrast-stretched image, a close and
      always valid approximation that needs no knowledge of the dataset.

    Determinism: ``v2.RandAugment`` draws its choices from the global CPU RNG, so each
    sample's seed comes from ``generator`` and the global CPU RNG state is saved and
    restored around the batch. Samples are processed one by one (about 0.2 ms each for
    32x32 on CPU), on ``x``'s device.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        if num_ops < 0:
            raise ConfigError(f"randaugment: num_ops must be >= 0, got {num_ops}")
        if not 0 <= magnitude < num_magnitude_bins:
            raise ConfigError(
                f"randaugment: magnitude must be in [0, {num_magnitude_bins - 1}], got {magnitude}"
            )
        if (mean is None) != (std is None):
            raise ConfigError(
                "randaugment: give both `mean` and `std` (the dataset's normalisation) or neither"
            )
        if std is not None and any(s <= 0 for s in std):
            raise ConfigError(f"randaugment: std values must be > 0, got {std}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self._op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample (shift, scale) with ``u = (x - shift) / scale`` in [0, 1]."""
        b, c = x.shape[:2]
        if self.mean is not None and self.std is not None:
            if len(self.mean) != c or len(self.std) != c:
                raise ConfigError(
                    f"randaugment: mean/std have {len(self.mean)}/{len(self.std)} values "
                    f"but the batch has {c} channels"
                )
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            return (-mean / std).expand(b, c, 1, 1), (1.0 / std).expand(b, c, 1, 1)
        flat = x.reshape(b, -1)
        lo, hi = flat.amin(1), flat.amax(1)
        return lo.view(b, 1, 1, 1), (hi - lo).clamp_min(1e-6).view(b, 1, 1, 1)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_batch(x)
        shift, scale = self._stats(x)
        unit = ((x - shift) / scale).clamp_(0.0, 1.0)
        seeds = torch.randint(2**62, (x.shape[0],), generator=generator, device=generator.device).tolist()
        out = torch.empty_like(unit)
        with torch.random.fork_rng(devices=[]):  # restores the global CPU RNG afterwards
            for i, seed in enumerate(seeds):
                torch.default_generator.manual_seed(seed)
                out[i] = self._op(unit[i])
        return out * scale + shift
