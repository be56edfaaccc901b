"""Small CNNs for 28×28 (MNIST-like) inputs: the default quickstart teacher and student.

A conv stem at full resolution, then three stages that each halve the resolution
(max-pool, conv-BN-ReLU: 28 → 14 → 7 → 3), global average pooling and a linear classifier.
``width`` scales every stage, so ``smallcnn_wide`` (width 16: ~98k parameters, ~2.6M MACs
per image) and ``smallcnn_thin`` (width 4: ~6.5k parameters) form a teacher→student pair with
a real capacity gap (16× the parameters) that trains in seconds per epoch on a 2-core CPU.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdbench.features import TapSpec


class SmallCNN(nn.Module):
    """stem → stage1 → stage2 → stage3 (each pooling by 2) → global average pool → linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = (width, 2 * width, 4 * width, 8 * width)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))

        self.stem = block(in_channels, w[0])
        self.stem_act = nn.ReLU()
        self.stage1 = nn.Sequential(nn.MaxPool2d(2), block(w[0], w[1]))
        self.act1 = nn.ReLU()
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), block(w[1], w[2]))
        self.act2 = nn.ReLU()
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), block(w[2], w[3]))
        self.act3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        self.kd_taps = TapSpec(
            stages=("stem_act", "act1", "act2", "act3"),
            preact=("stem_act", "act1", "act2", "act3"),
            classifier="fc",
            blocks=("stem_act", "act1", "act2", "act3"),  # one conv per stage: the blocks are the stages
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_act(self.stem(x))
        x = self.act1(self.stage1(x))
        x = self.act2(self.stage2(x))
        x = self.act3(self.stage3(x))
        return self.fc(self.pool(x).flatten(1))


def smallcnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A SmallCNN of any width."""
    return SmallCNN(num_classes, in_channels, width)


def smallcnn_wide(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The quickstart teacher (width 16)."""
    return SmallCNN(num_classes, in_channels, 16)


def smallcnn_thin(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The quickstart student (width 4)."""
    return SmallCNN(num_classes, in_channels, 4)
