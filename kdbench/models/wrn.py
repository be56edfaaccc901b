"""Wide ResNets: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (WRN-depth-width).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016. Architecture as in RepDistiller
(``models/wrn.py``): a 3×3 stem conv (no BN/ReLU), three stages of pre-activation blocks
(BN-ReLU-conv-BN-ReLU-conv; 1×1 conv shortcut where the width or stride changes), a final
BN-ReLU, global average pooling and a linear classifier. Parameter names follow the
reference (``block1.layer.0.convShortcut`` …), so its checkpoints load with ``load_state_dict``.

Taps: the stages are pre-activation blocks, so the stage outputs carry no ReLU. As in the
reference's ``preact=True`` features, the pre-activation of a stage is the BN that the next
block applies to it: the input of ``block2.layer.0.relu1``, ``block3.layer.0.relu1`` and the
final ``relu``. The stem's pre-activation is the stem output itself (the input of
``block1.layer.0.bn1``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdbench.features import TapSpec
from kdbench.models._common import block_paths, init_fan_out_normal


class BasicBlock(nn.Module):
    """Pre-activation block; with a width or stride change the shortcut starts from BN-ReLU(x)."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = cin == cout
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``n`` blocks, the first one carrying the stride and the width change."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate) for i in range(n))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """stem conv → block1 → block2 (/2) → block3 (/2) → BN-ReLU → average pool → fc."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        w = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, w[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, w[1], w[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, w[2], w[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        init_fan_out_normal(self)
        self.kd_taps = TapSpec(
            stages=("conv1", "block1", "block2", "block3"),
            preact=("block1.layer.0.bn1", "block2.layer.0.relu1", "block3.layer.0.relu1", "relu"),
            classifier="fc",
            blocks=block_paths(self, "conv1", ("block1.layer", "block2.layer", "block3.layer")),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))


def wrn_16_1(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-1 (0.18M parameters on CIFAR-100)."""
    return WideResNet(16, 1, num_classes, in_channels, drop_rate)


def wrn_16_2(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-2 (0.70M)."""
    return WideResNet(16, 2, num_classes, in_channels, drop_rate)


def wrn_40_1(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-1 (0.57M)."""
    return WideResNet(40, 1, num_classes, in_channels, drop_rate)


def wrn_40_2(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-2 (2.26M)."""
    return WideResNet(40, 2, num_classes, in_channels, drop_rate)
