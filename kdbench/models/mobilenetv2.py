"""MobileNetV2 for 32×32 inputs, width ×0.5, expansion 6 (the KD literature's "MobileNetV2").

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
Architecture as in RepDistiller (``models/mobilenetv2.py``, ``mobile_half``; from "Knowledge
Distillation via Route Constrained Optimization"): a stride-2 3×3 stem, seven groups of
inverted-residual blocks (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1)
(6,160,3,2) (6,320,1,1) with c halved, a 1×1 conv to 1280 channels, average pooling and a
linear classifier. Parameter names follow the reference, so its checkpoints load with
``load_state_dict``.

Taps as in the reference: the stem and the outputs of groups 1, 2, 4 and 6. Those groups end
in a linear bottleneck (no ReLU), so a stage's pre-activation is the stage output itself,
read as the input of the next module.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdbench.features import TapSpec
from kdbench.models._common import block_paths, init_fan_out_normal

#: (output channels c, blocks n, first stride s) per group, before the width multiplier;
#: the first group does not expand, the others expand by ``expansion``
_SETTING = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 project-BN; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """stem → 7 groups of inverted residuals → 1×1 conv → average pool → linear."""

    def __init__(
        self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_channels: int = 3
    ):
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for g, (c, n, s) in enumerate(_SETTING):
            cout = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(cin, cout, s if i == 0 else 1, 1 if g == 0 else expansion))
                cin = cout
            self.blocks.append(nn.Sequential(*group))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_fan_out_normal(self, linear_std=0.01)
        groups = tuple(f"blocks.{g}" for g in range(len(self.blocks)))
        self.kd_taps = TapSpec(
            stages=("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"),
            preact=("conv1.2", "blocks.2", "blocks.3", "blocks.5", "conv2"),
            classifier="classifier.0",
            blocks=block_paths(self, "conv1", groups) + ("conv2",),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(self.avgpool(x).flatten(1))


def mobilenetv2(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """MobileNetV2 ×0.5, expansion 6 (0.81M parameters on CIFAR-100)."""
    return MobileNetV2(6, 0.5, num_classes, in_channels)
