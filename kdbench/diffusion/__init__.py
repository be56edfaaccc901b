"""Diffusion models for data generation (ConfiG): a small class-conditional UNet trained on the
student's own data, or a local diffusers directory; a differentiable few-step DDIM sampler and
DDIM inversion. Needs the ``diffusion`` extra (``pip install 'kdbench[diffusion]'``)."""

from kdbench.diffusion.model import DiffusionModel, inspect_local, load_local, tiny_unet
from kdbench.diffusion.sampler import DDIMPath
from kdbench.diffusion.train import Recipe, obtain_trained, train_unet

__all__ = [
    "DDIMPath",
    "DiffusionModel",
    "Recipe",
    "inspect_local",
    "load_local",
    "obtain_trained",
    "tiny_unet",
    "train_unet",
]
