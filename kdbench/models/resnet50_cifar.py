"""ResNet-50 for 32×32 inputs (the CIFAR-100 teacher of the KD literature).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Architecture as in
RepDistiller (``models/resnetv2.py``, ``ResNet50``): the ImageNet ResNet-50 body (Bottleneck
blocks [3, 4, 6, 3], widths 64/128/256/512, expansion 4) with a 3×3 stride-1 stem and no
max-pool, so a 32×32 image reaches the last stage at 4×4. Parameter names follow the
reference, so its checkpoints load with ``load_state_dict``.

Each block's last ReLU is its own module ``act`` so the stage's pre-activation can be read
with a hook; ``in_channels`` sets the stem's input channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdbench.features import TapSpec
from kdbench.models._common import block_paths


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4, plus the shortcut, then ReLU (``act``)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


class ResNet50Cifar(nn.Module):
    """stem (3×3 conv-BN-ReLU) → layer1 … layer4 → average pool → linear."""

    def __init__(
        self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100, in_channels: int = 3
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        cin = 64
        stages = []
        for planes, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2), strict=True):
            layer = []
            for i in range(n):
                layer.append(Bottleneck(cin, planes, stride if i == 0 else 1))
                cin = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.kd_taps = TapSpec(
            stages=("relu", "layer1", "layer2", "layer3", "layer4"),
            preact=("relu", *(f"layer{i + 1}.{n - 1}.act" for i, n in enumerate(blocks))),
            classifier="linear",
            blocks=block_paths(self, "relu", ("layer1", "layer2", "layer3", "layer4")),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-50, CIFAR variant (23.71M parameters on CIFAR-100)."""
    return ResNet50Cifar((3, 4, 6, 3), num_classes, in_channels)
