"""Helpers shared by the feature-based methods (VID, AB, FT, FSP, CRD, ReviewKD, SemCKD, SRRL, SimKD, CKA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever of two maps is spatially larger down to the other's size.

    RepDistiller / SemCKD / SimKD align maps this way before comparing them (they assume
    square maps and compare heights; this compares heights and pools to the full (H, W)).
    """
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, b.shape[2:])
    elif a.shape[2] < b.shape[2]:
        b = F.adaptive_avg_pool2d(b, a.shape[2:])
    return a, b


def residual_preacts(preact: Sequence, n_stages: int) -> list:
    """The pre-activations of the residual stages (RepDistiller's ``feat[1:-1]`` with ``preact=True``).

    A model may or may not expose a pre-activation for its stem: when the list is as long as
    the stage list its first entry is the stem's and is dropped; otherwise the last
    ``n_stages - 1`` entries are used.
    """
    items = list(preact)
    return items[1:] if len(items) == n_stages else items[-(n_stages - 1) :]


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
