"""FT: paraphrasing complex network, network compression via factor transfer (Kim et al., NeurIPS 2018).

Initialisation stage (``init_epochs``): a paraphraser P (conv encoder to ⌊k·C_t⌋ channels and
a transposed-conv decoder, LeakyReLU 0.1, no BatchNorm) learns to reconstruct the teacher's
last stage t = ``stages[-1]`` (RepDistiller's ``feat[-2]``): ``ft_init = mse(P.dec(P.enc(t)), t)``.
Afterwards P is frozen. A translator T_r (conv encoder with BatchNorm, student channels →
⌊k·C_t⌋) is trained with the student, and the factors are compared:

    factor(x) = normalize( mean_c x^p1 ),      ft = mean | factor(T_r(s)) − factor(P.enc(t)) |^p2

(the larger map is average-pooled to the smaller's size first).

Reference: HobbitLong/RepDistiller ``distiller_zoo/FT.py`` (FactorTransfer),
``models/util.py`` (Paraphraser, Translator), ``helper/pretrain.py`` (init stage trains the
paraphraser alone; RepDistiller uses lr 0.01 there for ResNet/WRN students).
Defaults: k = 0.5, p1 = 2, p2 = 1, β = 200, CE weight 1 (``-a 0 -b 200``), init_epochs = 30.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.features import Features
from kdbench.methods._blocks import pool_to_smaller
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps


def _encoder(c_in: int, c_out: int, use_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_in), (c_in, c_out), (c_out, c_out)):
        layers += [
            nn.Conv2d(a, b, 3, 1, 1),
            nn.BatchNorm2d(b) if use_bn else nn.Identity(),
            nn.LeakyReLU(0.1),
        ]
    return nn.Sequential(*layers)


def _decoder(c_factor: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((c_factor, c_factor), (c_factor, c_out), (c_out, c_out)):
        layers += [nn.ConvTranspose2d(a, b, 3, 1, 1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FT(Distiller):
    """Match the student's translated factor to the teacher's paraphrased factor."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("stages",))
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "ft": 200.0, "ft_init": 1.0}

    def __init__(
        self, ctx: MethodContext, init_epochs: int = 30, k: float = 0.5, p1: float = 2.0, p2: float = 1.0
    ):
        super().__init__(ctx)
        self.init_epochs = init_epochs
        self.p1, self.p2 = p1, p2
        c_s = ctx.student_shapes["stages"][-1][0]
        c_t = ctx.teacher_shapes["stages"][-1][0]
        c_factor = int(c_t * k)
        self.paraphraser_enc = _encoder(c_t, c_factor, use_bn=False)
        self.paraphraser_dec = _decoder(c_factor, c_t)
        self.translator = _encoder(c_s, c_factor, use_bn=True)
        self.frozen = False

    def init_loss(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        f_t = t.stages[-1]
        return {"ft_init": F.mse_loss(self.paraphraser_dec(self.paraphraser_enc(f_t)), f_t)}

    def init_parameters(self, student: nn.Module) -> Iterator[nn.Parameter]:
        yield from self.paraphraser_enc.parameters()
        yield from self.paraphraser_dec.parameters()

    def begin_stage(self, stage: str) -> None:
        """The paraphraser trains in the init stage only; distillation starts with it frozen."""
        if stage == "train":
            self.freeze_paraphraser()

    def freeze_paraphraser(self) -> None:
        """End of the init stage: the paraphraser is fixed from now on."""
        for p in [*self.paraphraser_enc.parameters(), *self.paraphraser_dec.parameters()]:
            p.requires_grad_(False)
            p.grad = None
        self.paraphraser_enc.eval()
        self.paraphraser_dec.eval()
        self.frozen = True

    def train(self, mode: bool = True) -> FT:
        super().train(mode)
        if self.frozen:
            self.paraphraser_enc.eval()
            self.paraphraser_dec.eval()
        return self

    def factor(self, f: Tensor) -> Tensor:
        return F.normalize(f.pow(self.p1).mean(1).flatten(1))

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            factor_t = self.paraphraser_enc(t.stages[-1])
        f_s, f_t = pool_to_smaller(self.translator(s.stages[-1]), factor_t)
        diff = self.factor(f_s) - self.factor(f_t)
        loss = diff.abs().mean() if self.p2 == 1 else diff.pow(self.p2).mean()
        return {"ft": loss}
