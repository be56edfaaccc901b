"""VGG with batch normalisation for 32×32 inputs: vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015. Architecture as in RepDistiller (``models/vgg.py``, the ``*_bn`` variants its
model table registers as ``vggN``): five blocks of conv(bias)-BN-ReLU, 2×2 max-pools after
blocks 0-2 (and after block 3 only for 64×64 inputs), global average pooling and a single
linear classifier (no FC stack). Parameter names follow the reference, so its checkpoints
load with ``load_state_dict``.

Each block ends with its BN; the block's ReLU is a separate module (``relu0`` … ``relu4``),
so the stage output is that ReLU's output and its pre-activation that ReLU's input.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdbench.features import TapSpec
from kdbench.models._common import init_fan_out_normal

#: convolution widths per block (the reference's configurations S, A, B, D, E)
_CFG: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(widths: tuple[int, ...], cin: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, without the final ReLU (the model applies it as a tap module)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """block0 → pool → block1 → pool → block2 → pool → block3 (→ pool at 64×64) → block4 → avg → linear."""

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        cins = (in_channels, *(c[-1] for c in cfg[:-1]))
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(c, cin) for c, cin in zip(cfg, cins, strict=True)
        )
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        init_fan_out_normal(self, linear_std=0.01)
        relus = tuple(f"relu{i}" for i in range(5))
        # blocks: every conv layer's ReLU (inside a block, then the block's own ReLU module)
        blocks: list[str] = []
        for i in range(5):
            block = self.get_submodule(f"block{i}")
            blocks += [f"block{i}.{j}" for j, m in enumerate(block) if isinstance(m, nn.ReLU)] + [relus[i]]
        self.kd_taps = TapSpec(stages=relus, preact=relus, classifier="classifier", blocks=tuple(blocks))

    def forward(self, x: Tensor) -> Tensor:
        # the reference pools after block 3 only for 64×64 inputs (Tiny-ImageNet-sized)
        pool3 = x.shape[2] == 64
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if pool3:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


def vgg8(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-8 with BN (3.96M parameters on CIFAR-100)."""
    return VGG(_CFG[8], num_classes, in_channels)


def vgg11(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-11 with BN (9.27M)."""
    return VGG(_CFG[11], num_classes, in_channels)


def vgg13(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-13 with BN (9.46M)."""
    return VGG(_CFG[13], num_classes, in_channels)


def vgg16(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-16 with BN (14.77M)."""
    return VGG(_CFG[16], num_classes, in_channels)


def vgg19(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-19 with BN (20.09M)."""
    return VGG(_CFG[19], num_classes, in_channels)
