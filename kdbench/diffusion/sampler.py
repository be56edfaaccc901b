"""Deterministic few-step DDIM (eta = 0): inversion of an image to a latent, and a sampler from
that latent back to an image that autograd can differentiate (checkpointed per step).

A path of ``K = round(steps * strength)`` levels ``t_1 < ... < t_K`` out of an even ``steps``-step
grid over the training timesteps; level 0 is the clean image (alpha = 1). Inversion walks up the
levels, sampling walks down, with the same update (Song et al. 2021, eq. 12 with sigma = 0)::

    x0 = (x_k - sqrt(1 - a_k) eps) / sqrt(a_k);   x_j = sqrt(a_j) x0 + sqrt(1 - a_j) eps

using ``eps`` at the level it leaves. ``strength < 1`` stops at an intermediate noise level so
the decoded image stays a variant of its source (as SDEdit does); ``strength = 1`` inverts to
pure noise.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdbench.diffusion.model import DiffusionModel
from kdbench.errors import ConfigError


class DDIMPath:
    """The timesteps and alphas of one few-step DDIM path through ``model``'s schedule."""

    def __init__(self, model: DiffusionModel, steps: int = 10, strength: float = 0.5):
        if steps < 1:
            raise ConfigError(f"ddim_steps must be >= 1, got {steps}")
        if not 0 < strength <= 1:
            raise ConfigError(f"strength must be in (0, 1], got {strength}")
        n_train = model.num_train_timesteps
        if steps > n_train:
            raise ConfigError(f"ddim_steps {steps} exceeds the model's {n_train} training timesteps")
        levels = max(1, round(steps * strength))
        self.model = model
        # level k sits at timestep round(k * (T - 1) / steps); level 0 is the clean image
        self.timesteps = [round(k * (n_train - 1) / steps) for k in range(levels + 1)]
        a = model.alphas_cumprod.float()
        self.alphas = [1.0] + [float(a[t]) for t in self.timesteps[1:]]

    @property
    def levels(self) -> int:
        return len(self.timesteps) - 1

    def _move(self, x: Tensor, eps: Tensor, a_from: float, a_to: float) -> Tensor:
        x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
        return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps

    def _down(self, x: Tensor, k: int, y: Tensor | None) -> Tensor:
        eps = self.model.eps(x, self.timesteps[k], y)
        return self._move(x, eps, self.alphas[k], self.alphas[k - 1])

    @torch.no_grad()
    def invert(self, images: Tensor, y: Tensor | None) -> Tensor:
        """Images in [-1, 1] -> the latent ``z`` at the top level (deterministic)."""
        x = self.model.encode(images)
        for k in range(1, self.levels + 1):
            eps = self.model.eps(x, self.timesteps[k - 1], y)
            x = self._move(x, eps, self.alphas[k - 1], self.alphas[k])
        return x

    def sample(self, z: Tensor, y: Tensor | None, grad_checkpoint: bool = True) -> Tensor:
        """The latent ``z`` -> images in [-1, 1]; differentiable in ``z``.

        With ``grad_checkpoint`` each step's activations are recomputed in the backward pass,
        so memory holds one UNet forward at a time instead of ``levels`` of them.
        """
        x = z
        use_ckpt = grad_checkpoint and torch.is_grad_enabled() and z.requires_grad
        for k in range(self.levels, 0, -1):
            if use_ckpt:
                x = checkpoint(self._down, x, k, y, use_reentrant=False)
            else:
                x = self._down(x, k, y)
        if self.model.vae is not None:
            if use_ckpt:
                return checkpoint(self.model.decode, x, use_reentrant=False)
            return self.model.decode(x)
        return x
