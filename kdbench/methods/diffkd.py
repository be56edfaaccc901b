"""DiffKD: knowledge diffusion for distillation (Huang et al., NeurIPS 2023, arXiv 2305.15712).

A light diffusion model, trained on the teacher's features, denoises the student's feature before
it is matched to the teacher's. One DiffKD unit, for a student map f_s and a teacher map f_t:

    z_t  = E(f_t)                       linear autoencoder (1×1 conv + BN), trained by
    ae   = mse(f_t, D(z_t))             reconstruction; the targets below use z_t detached
    x    = trans(f_s)                   1×1 conv to the latent width
    w    = adapter(x) ∈ (0, 1)          adaptive noise matching: per-sample weight
    x_T  = w · x + (1 − w) · ε₀         (ε₀ ~ N(0, I); the reference's ``add_noise_diff2``)
    x_0  = DDIM_n(x_T)                  n deterministic DDIM steps (η = 0, ε-prediction) from
                                        t = (n−1)·r down to 0, r = T_train // 2n, ᾱ from a linear
                                        β schedule 1e-4..0.02 over T_train steps, ᾱ_prev(0) = 1
    refined = proj(x_0)                 1×1 conv + BN
    ddim = mse(ε_θ(√ᾱ_τ z_t + √(1−ᾱ_τ) ε, τ), ε)    noise-prediction loss on the teacher,
                                                    τ ~ U{0..T_train−1}, ε ~ N(0, I)

ε_θ adds a learned timestep embedding (1280 × C) to its input, then two residual bottlenecks, a
1×1 conv and BN (kernel 3, feature maps); the adapter is a bottleneck (reduction 8), global
pooling and a 2-way softmax. As in the authors' classification code there are two units: one on
the feature map ``stages[layer]`` (kernel 3, with the autoencoder) and one on the logits seen as
(B, K, 1, 1) maps (kernel 1: the networks are 1×1 conv MLPs, no autoencoder). Terms (weights 1):

    diffkd        = mse(refined_feat, z_t)
    diffkd_logits = τ² KL(softmax(z_t / τ) ‖ softmax(refined_logits / τ)), batch mean
    ddim          = ddim_feat + ddim_logits
    ae            = mse(f_t, D(E(f_t)))

so the total is CE + the four, the reference's ``ori_loss + kd_loss_weight · Σ``. Gradients reach
the student through the denoising chain. Random draws (ε₀, ε, τ per unit, in the reference's order)
come from torch's default generator on the features' device, which the engine seeds per cell and
checkpoints; :meth:`DiffusionUnit.forward` also takes them fixed.

Reference: hunto/DiffKD (commit 904a465), whose code is the submodule hunto/image_classification_sota
at commit 6cb1441: ``lib/models/losses/diffkd/{diffkd,diffkd_modules,scheduling_ddim}.py`` (DiffKD,
DiffusionModel, NoiseAdapter, AutoEncoder, DDIMPipeline, DDIMScheduler) and
``lib/models/losses/kd_loss.py`` (the ``diffkd`` branch of KDLoss: kernel sizes [3, 1], MSE on the
feature, KLDivergence(τ) on the logits). Submodule names follow the reference, so its ``_diff``
weights load by key. Defaults: the authors publish one DiffKD config,
``configs/strategies/distill/diffkd/diffkd_b1.yaml`` (ImageNet R34→R18: use_ae, ae_channels 1024,
τ = 1, ori_loss_weight 1, kd_loss_weight 1; 5 inference steps and 1000 training steps are the
DiffKD class defaults), and none for CIFAR-100; kd_loss.py's CIFAR entries (``cifar_resnet56``:
``layer3``; ``cifar_wrn_40_2``: the final ``relu``) pick the last feature map, kdbench's
``stages[-1]``, and the ``kd_loss_kwargs`` defaults in kd_loss.py are those of diffkd_b1.yaml, so
they are kdbench's CIFAR-100 defaults too. Note that ae_channels = 1024 widens, not compresses, a
teacher map of fewer channels (as it does for R34's 512 in the authors' own config);
``ae_channels: null`` takes the DiffKD class default, C_t // 2.

Deviation, only where the reference is undefined: its MSE needs student and teacher maps of the same
spatial size; for pairs where they differ (cross-family CIFAR pairs such as resnet32x4 → ShuffleV2)
kdbench average-pools the larger map to the smaller's size first, as it does for AT and NST.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.kernels import kd_loss
from kdbench.methods._util import match_spatial
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps

#: rows of the timestep embedding (the reference's ``nn.Embedding(1280, C)``)
EMBEDDING_ROWS = 1280
#: the linear β schedule of the reference's DDIMScheduler
BETA_START, BETA_END = 1e-4, 0.02
#: (initial noise ε₀, training noise ε, training timesteps τ) of one unit
Draws = tuple[Tensor, Tensor, Tensor]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Bottleneck(nn.Module):
    """x + (1×1 conv, BN, ReLU, 3×3 conv, BN, ReLU, 1×1 conv, BN)(x), width C // reduction inside."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        mid = channels // reduction
        self.block = nn.Sequential(
            *_conv_bn_relu(channels, mid, 1),
            *_conv_bn_relu(mid, mid, 3),
            nn.Conv2d(mid, channels, 1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class NoisePredictor(nn.Module):
    """ε_θ(x, t): the noise in x at timestep t (the reference's ``DiffusionModel``)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.time_embedding = nn.Embedding(EMBEDDING_ROWS, channels)
        c = channels
        if kernel_size == 3:
            self.pred = nn.Sequential(Bottleneck(c), Bottleneck(c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        else:
            self.pred = nn.Sequential(
                *_conv_bn_relu(c, 4 * c, 1),
                nn.Conv2d(4 * c, c, 1),
                nn.BatchNorm2d(c),
                *_conv_bn_relu(c, 4 * c, 1),
                nn.Conv2d(4 * c, c, 1),
            )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.pred(x + self.time_embedding(t)[..., None, None])


class NoiseAdapter(nn.Module):
    """Per-sample weight w ∈ (0, 1) of the student feature in the initial noisy sample."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        c = channels
        if kernel_size == 3:
            self.feat = nn.Sequential(Bottleneck(c, reduction=8), nn.AdaptiveAvgPool2d(1))
        else:
            self.feat = nn.Sequential(*_conv_bn_relu(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))
        self.pred = nn.Linear(c, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pred(self.feat(x).flatten(1)).softmax(1)[:, 0]


class AutoEncoder(nn.Module):
    """Linear autoencoder of the teacher's map: encoder 1×1 conv + BN, decoder 1×1 conv."""

    def __init__(self, channels: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, latent, 1), nn.BatchNorm2d(latent))
        self.decoder = nn.Sequential(nn.Conv2d(latent, channels, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(x)
        return hidden, self.decoder(hidden)


class DiffusionUnit(nn.Module):
    """One DiffKD unit: denoises a student map toward the (encoded) teacher map's distribution."""

    def __init__(
        self,
        c_student: int,
        c_teacher: int,
        kernel_size: int,
        ae_channels: int | None,
        inference_steps: int,
        train_timesteps: int,
    ):
        super().__init__()
        self.ae: AutoEncoder | None = None
        if ae_channels is not None:
            self.ae = AutoEncoder(c_teacher, ae_channels)
            c_teacher = ae_channels
        self.trans = nn.Conv2d(c_student, c_teacher, 1)
        self.model = NoisePredictor(c_teacher, kernel_size)
        self.noise_adapter = NoiseAdapter(c_teacher, kernel_size)
        self.proj = nn.Sequential(nn.Conv2d(c_teacher, c_teacher, 1), nn.BatchNorm2d(c_teacher))
        self.inference_steps, self.train_timesteps = inference_steps, train_timesteps
        # ᾱ is computed in float32, as the reference's scheduler does, and used in the features' dtype
        betas = torch.linspace(BETA_START, BETA_END, train_timesteps, dtype=torch.float32)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0), persistent=False)

    def draw(self, x: Tensor, target: Tensor) -> Draws:
        """ε₀ (like x), ε (like target, drawn in the default dtype), τ per sample: the reference's order."""
        init_noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        noise = torch.randn(target.shape, device=target.device).to(target.dtype)
        timesteps = torch.randint(0, self.train_timesteps, (target.shape[0],), device=target.device)
        return init_noise, noise, timesteps

    def _alphas(self, like: Tensor) -> Tensor:
        return self.alphas_cumprod.to(device=like.device, dtype=like.dtype)

    def denoise(self, x: Tensor, init_noise: Tensor) -> Tensor:
        """Adaptive noising, then deterministic DDIM (η = 0) over the lower half of 2n evenly spaced steps."""
        w = self.noise_adapter(x).view(-1, *([1] * (x.dim() - 1)))
        x = w * x + (1 - w) * init_noise
        alphas = self._alphas(x)
        ratio = self.train_timesteps // (2 * self.inference_steps)
        for i in reversed(range(self.inference_steps)):
            t = i * ratio
            eps = self.model(x, torch.tensor(t, device=x.device))
            a_t = alphas[t]
            a_prev = alphas[t - ratio] if t >= ratio else alphas.new_tensor(1.0)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x

    def noise_loss(self, target: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """mse(ε_θ(√ᾱ_τ z + √(1−ᾱ_τ) ε, τ), ε): trains ε_θ on the teacher's (encoded) map."""
        a = self._alphas(target)[timesteps].view(-1, *([1] * (target.dim() - 1)))
        noisy = a.sqrt() * target + (1 - a).sqrt() * noise
        return F.mse_loss(self.model(noisy, timesteps), noise)

    def forward(
        self, f_s: Tensor, f_t: Tensor, draws: Draws | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(refined student map, target map, noise-prediction loss, reconstruction loss or None)."""
        x = self.trans(f_s)
        rec_loss = None
        if self.ae is not None:
            hidden, rec = self.ae(f_t)
            rec_loss = F.mse_loss(f_t, rec)
            f_t = hidden.detach()
        init_noise, noise, timesteps = draws if draws is not None else self.draw(x, f_t)
        refined = self.proj(self.denoise(x, init_noise))
        return refined, f_t, self.noise_loss(f_t, noise, timesteps), rec_loss


class DiffKD(Distiller):
    """Student feature and logits denoised by diffusion models trained on the teacher's, then matched."""

    taps: ClassVar[Taps] = Taps(student=("logits", "stages"), teacher=("logits", "stages"))
    default_weights: ClassVar[dict[str, float]] = {
        "ce": 1.0,
        "diffkd": 1.0,
        "diffkd_logits": 1.0,
        "ddim": 1.0,
        "ae": 1.0,
    }

    def __init__(
        self,
        ctx: MethodContext,
        layer: int = -1,
        use_ae: bool = True,
        ae_channels: int | None = 1024,
        tau: float = 1.0,
        inference_steps: int = 5,
        train_timesteps: int = 1000,
        logits: bool = True,
    ):
        super().__init__(ctx)
        if inference_steps < 1 or 2 * inference_steps > train_timesteps:
            raise ConfigError(
                f"diffkd: inference_steps must be in [1, train_timesteps / 2], got {inference_steps} "
                f"with train_timesteps {train_timesteps}"
            )
        if train_timesteps > EMBEDDING_ROWS:
            raise ConfigError(f"diffkd: train_timesteps must be <= {EMBEDDING_ROWS}, got {train_timesteps}")
        s_shape, t_shape = ctx.stage_maps(layer, "diffkd")
        latent = (ae_channels or t_shape[0] // 2) if use_ae else None
        width = latent or t_shape[0]
        if width < 8:
            raise ConfigError(
                f"diffkd's noise adapter needs at least 8 channels in the denoised map, got {width}; "
                "set ae_channels to 8 or more"
            )
        self.layer, self.tau = layer, tau
        steps = {"inference_steps": inference_steps, "train_timesteps": train_timesteps}
        self.feature = DiffusionUnit(s_shape[0], t_shape[0], 3, latent, **steps)
        self.logit_unit: DiffusionUnit | None = None
        if logits:
            k = ctx.num_classes
            self.logit_unit = DiffusionUnit(k, k, 1, None, **steps)

    @classmethod
    def taps_for(cls, logits: bool = True, **_params: object) -> Taps:
        return cls.taps if logits else Taps(student=("logits", "stages"), teacher=("stages",))

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        f_s, f_t = match_spatial(s.stages[self.layer], t.stages[self.layer])
        refined, target, ddim, rec = self.feature(f_s, f_t)
        terms = {"diffkd": F.mse_loss(refined, target), "ddim": ddim}
        if rec is not None:
            terms["ae"] = rec
        if self.logit_unit is not None:
            assert s.logits is not None and t.logits is not None
            z_s, z_t = s.logits[:, :, None, None], t.logits[:, :, None, None]
            refined_z, _, ddim_z, _ = self.logit_unit(z_s, z_t)
            terms["diffkd_logits"] = kd_loss(refined_z.flatten(1), t.logits, self.tau)
            terms["ddim"] = ddim + ddim_z
        return terms
