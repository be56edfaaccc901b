"""ShuffleNetV2 1× for 32×32 inputs (stage widths 116/232/464, head 1024): ``shufflev2``.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV
2018. Architecture as in RepDistiller (``models/ShuffleNetv2.py``, ``ShuffleV2``): a 1×1 stem
to 24 channels (no stride, no max-pool), three stages of one stride-2 down-sampling unit and
[3, 7, 3] channel-split units, a 1×1 conv-BN-ReLU to 1024 channels, global average pooling and
a linear classifier. Parameter names follow the reference, so its checkpoints load with
``load_state_dict``.

A channel-split unit here applies its final ReLU (module ``act``) to the concatenation
``[kept half, branch]`` rather than to the branch alone. The kept half is always the output
of an earlier ReLU, so this computes the same values and the same parameter gradients, and
the input of ``act`` is exactly the reference's pre-activation feature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdbench.features import TapSpec
from kdbench.models._common import block_paths


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """[N, g·c, H, W] → interleave the ``groups`` channel groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicBlock(nn.Module):
    """Channel split: half passes, half goes 1×1-BN-ReLU, 3×3 depthwise-BN, 1×1-BN; concat, shuffle."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.keep = int(channels * split_ratio)
        c = self.keep
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.keep], x[:, self.keep :]
        out = self.relu(self.bn1(self.conv1(x2)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        return channel_shuffle(self.act(torch.cat([x1, out], 1)))


class DownBlock(nn.Module):
    """Stride-2 unit: two branches of ``cout / 2`` channels each, concatenated and shuffled."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        # left: 3×3 depthwise (stride 2)-BN, 1×1-BN-ReLU
        self.conv1 = nn.Conv2d(cin, cin, kernel_size=3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1×1-BN-ReLU, 3×3 depthwise (stride 2)-BN, 1×1-BN-ReLU
        self.conv3 = nn.Conv2d(cin, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """stem (1×1 conv-BN-ReLU) → layer1 … layer3 (each /2) → 1×1 conv-BN-ReLU → average pool → linear."""

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        cin = 24
        stages = []
        for width, n in zip(widths[:3], blocks, strict=True):
            stages.append(nn.Sequential(DownBlock(cin, width), *(BasicBlock(width) for _ in range(n))))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)
        # each stage is [DownBlock, n × BasicBlock]: its last unit has index n
        self.kd_taps = TapSpec(
            stages=("relu1", "layer1", "layer2", "layer3"),
            preact=("relu1", *(f"layer{i + 1}.{n}.act" for i, n in enumerate(blocks))),
            classifier="linear",
            blocks=block_paths(self, "relu1", ("layer1", "layer2", "layer3")) + ("relu2",),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


def shufflev2(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ShuffleNetV2 1× (1.36M parameters on CIFAR-100)."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes, in_channels)
