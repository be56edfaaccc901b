"""ShuffleNetV1 for 32×32 inputs (groups 3, stage widths 240/480/960): ``shufflev1``.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018. Architecture as in RepDistiller (``models/ShuffleNetv1.py``,
``ShuffleV1``): a 1×1 stem to 24 channels (no stride, no max-pool), three stages of [4, 8, 4]
bottlenecks (grouped 1×1, channel shuffle, 3×3 depthwise, grouped 1×1; the first block of a
stage has stride 2 and concatenates an average-pooled shortcut), global average pooling and a
linear classifier. Parameter names follow the reference, so its checkpoints load with
``load_state_dict``.

Each block's last ReLU is its own module ``act`` so the stage's pre-activation can be read
with a hook; ``in_channels`` sets the stem's input channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdbench.features import TapSpec
from kdbench.models._common import block_paths


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g·c, H, W] → interleave the ``groups`` channel groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet unit; with stride 2 the output concatenates the pooled input (``cout`` excludes it)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        # the stem has only 24 channels: the first 1×1 conv of the network is not grouped
        self.g = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, kernel_size=1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(self.relu(self.bn1(self.conv1(x))), self.g)
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.act(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """stem (1×1 conv-BN-ReLU) → layer1 (/2) → layer2 (/2) → layer3 (/2) → average pool → linear."""

    def __init__(
        self,
        widths: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin = 24
        stages = []
        for width, n in zip(widths, blocks, strict=True):
            layer = []
            for i in range(n):
                # the first block concatenates its pooled input, so its branch makes width - cin channels
                layer.append(Bottleneck(cin, width - cin if i == 0 else width, 2 if i == 0 else 1, groups))
                cin = width
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        self.kd_taps = TapSpec(
            stages=("relu", "layer1", "layer2", "layer3"),
            preact=("relu", *(f"layer{i + 1}.{n - 1}.act" for i, n in enumerate(blocks))),
            classifier="linear",
            blocks=block_paths(self, "relu", ("layer1", "layer2", "layer3")),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


def shufflev1(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ShuffleNetV1, groups 3 (0.95M parameters on CIFAR-100)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)
