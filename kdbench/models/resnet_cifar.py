"""CIFAR ResNets: resnet8 … resnet110 (widths 16/16/32/64) and resnet8x4 / resnet32x4 (32/64/128/256).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the 6n+2 CIFAR variant).
Architecture as in RepDistiller (``models/resnet.py``), the zoo behind the KD literature's
CIFAR-100 tables: a 3×3 stem, three stages of post-activation BasicBlocks (1×1 conv + BN
shortcut where the shape changes), global average pooling and a linear classifier.
Parameter names follow the reference, so its checkpoints load with ``load_state_dict``.

Deviations that do not change the function on 32×32 inputs: adaptive average pooling (so
28×28 works), an ``in_channels`` stem, and each block's last ReLU is its own module ``act``
so that the stage's pre-activation can be read with a hook.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdbench.features import TapSpec
from kdbench.models._common import block_paths


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU (``act``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(out + shortcut)


class ResNetCifar(nn.Module):
    """stem (conv-BN-ReLU) → layer1 → layer2 (/2) → layer3 (/2) → average pool → fc."""

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_channels: int = 3
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        last = n - 1
        self.kd_taps = TapSpec(
            stages=("relu", "layer1", "layer2", "layer3"),
            preact=("relu", f"layer1.{last}.act", f"layer2.{last}.act", f"layer3.{last}.act"),
            classifier="fc",
            blocks=block_paths(self, "relu", ("layer1", "layer2", "layer3")),
        )

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


_BASE = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def resnet8(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-8 (0.08M parameters on CIFAR-100)."""
    return ResNetCifar(8, _BASE, num_classes, in_channels)


def resnet14(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-14 (0.18M)."""
    return ResNetCifar(14, _BASE, num_classes, in_channels)


def resnet20(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-20 (0.28M)."""
    return ResNetCifar(20, _BASE, num_classes, in_channels)


def resnet32(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-32 (0.47M)."""
    return ResNetCifar(32, _BASE, num_classes, in_channels)


def resnet44(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-44 (0.67M)."""
    return ResNetCifar(44, _BASE, num_classes, in_channels)


def resnet56(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-56 (0.86M)."""
    return ResNetCifar(56, _BASE, num_classes, in_channels)


def resnet110(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-110 (1.74M)."""
    return ResNetCifar(110, _BASE, num_classes, in_channels)


def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-8 with 4× wider stages (1.23M)."""
    return ResNetCifar(8, _X4, num_classes, in_channels)


def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-32 with 4× wider stages (7.43M)."""
    return ResNetCifar(32, _X4, num_classes, in_channels)
