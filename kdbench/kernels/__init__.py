"""Fused KD / CKA ops with a pure-PyTorch fallback.

Stable API: :func:`kd_loss`, :func:`dkd_loss`, :func:`cka_matrix`, :func:`backend`.

The native ops (``kdbench._C``, built from csrc/ by setup.py) are used when the extension
is built and has a kernel for the inputs' device; otherwise, or when the environment sets
``KDBENCH_KERNELS=reference``, the pure-PyTorch versions in :mod:`kdbench.kernels.reference`
run. Both backends validate their inputs the same way and raise :class:`KernelInputError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.kernels import ops, reference

__all__ = ["KernelInputError", "backend", "cka_matrix", "dkd_loss", "gram_backend", "kd_loss"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class KernelInputError(KdbenchError, ValueError):
    """The inputs of a kernel op have the wrong shape, dtype or value."""


def _forced_reference() -> bool:
    return os.environ.get("KDBENCH_KERNELS", "").strip().lower() == "reference"


def backend() -> str:
    """ "native" when the compiled extension is in use, else "reference"."""
    return "native" if ops.AVAILABLE and not _forced_reference() else "reference"


def gram_backend() -> dict[str, str]:
    """Which kernel computes the float32 CPU Grams of :func:`cka_matrix` in this process:
    ``{"gram": "avx512" | "avx2" | "blas" | "reference", "reason": ...}``. Chosen once per
    process by CPU capability (``KDBENCH_GRAM=avx2|avx512|blas|measure`` overrides); see
    csrc/cka.cpp."""
    if backend() != "native":
        return {"gram": "reference", "reason": "the pure-PyTorch backend is in use"}
    name, reason = torch.ops.kdbench.gram_backend()
    return {"gram": name, "reason": reason}


def _use_native(x: Tensor) -> bool:
    return backend() == "native" and ops.has_kernel(x.device.type)


def _common_float(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    if not dtype.is_floating_point:
        raise KernelInputError(f"expected floating-point tensors, got {dtype}")
    return dtype


def _check_logits(s: Tensor, t: Tensor, T: float) -> tuple[Tensor, Tensor]:
    if not isinstance(s, Tensor) or not isinstance(t, Tensor):
        raise KernelInputError("student and teacher logits must be tensors")
    if s.dim() != 2 or s.shape != t.shape:
        raise KernelInputError(
            f"logits must both be [B, C] with the same shape; got student {tuple(s.shape)} "
            f"and teacher {tuple(t.shape)}"
        )
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise KernelInputError(f"logits must be non-empty, got shape {tuple(s.shape)}")
    if s.device != t.device:
        raise KernelInputError(f"logits on different devices: {s.device} and {t.device}")
    if not float(T) > 0:
        raise KernelInputError(f"temperature T must be positive, got {T}")
    dtype = _common_float(s, t)
    return s.to(dtype), t.to(dtype)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0) -> Tensor:
    """Hinton KD: ``KL(softmax(t/T) || softmax(s/T)) * T^2``, averaged over the batch.

    Differentiable w.r.t. the student logits, and the teacher logits when they require grad.
    float16 / bfloat16 logits (e.g. a model's output under ``torch.autocast``; the teacher's
    may be float32) are accumulated in float32: the loss is float32 then, and the gradients
    have the dtype of the logits they belong to.
    """
    s, t = _check_logits(student_logits, teacher_logits, T)
    if _use_native(s):
        return ops.kd_loss(s, t, T)
    return reference.kd_loss(s, t, T)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, each ``* T^2``.

    ``target`` holds the class index of each row ([B], integer). Same gradient contract and
    dtype handling as :func:`kd_loss`.
    """
    s, t = _check_logits(student_logits, teacher_logits, T)
    if not isinstance(target, Tensor) or target.dim() != 1 or target.shape[0] != s.shape[0]:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise KernelInputError(f"target must be a [B] = [{s.shape[0]}] tensor, got {shape}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise KernelInputError(f"target must hold integer class indices, got {target.dtype}")
    target = target.to(device=s.device, dtype=torch.long)
    if _use_native(s):
        return ops.dkd_loss(s, t, target, alpha, beta, T)
    return reference.dkd_loss(s, t, target, alpha, beta, T)


def cka_matrix(xs: Sequence[Tensor], ys: Sequence[Tensor], unbiased: bool = False) -> Tensor:
    """Linear CKA between every pair ``(xs[i], ys[j])`` → a ``[len(xs), len(ys)]`` tensor.

    Each activation is ``[n, ...]`` and is flattened per sample. ``unbiased`` selects the
    unbiased minibatch HSIC estimator (Nguyen et al. 2021; needs n >= 4) instead of the
    biased one. Differentiable w.r.t. xs and ys, so it can serve as a training loss.
    float16 / bfloat16 activations are computed in float32 (the result is float32).

    The native CPU op computes only the upper triangle of each centred Gram (an AVX-512 or
    AVX2 rank-k kernel, or BLAS GEMM tiles, chosen once per process: :func:`gram_backend`)
    and runs the layers in parallel over torch's threads; see csrc/cka.cpp.
    """
    xs, ys = list(xs), list(ys)
    if not xs or not ys:
        raise KernelInputError("cka_matrix needs at least one activation in xs and in ys")
    if not all(isinstance(a, Tensor) and a.dim() >= 1 and a.numel() > 0 for a in xs + ys):
        raise KernelInputError("cka_matrix activations must be non-empty [n, ...] tensors")
    n = xs[0].shape[0]
    for a in xs + ys:
        if a.shape[0] != n:
            raise KernelInputError(
                f"all activations need the same number of samples; got {a.shape[0]} and {n}"
            )
        if a.device != xs[0].device:
            raise KernelInputError(f"activations on different devices: {a.device}, {xs[0].device}")
    if unbiased and n < 4:
        raise KernelInputError(f"the unbiased CKA estimator needs at least 4 samples, got {n}")
    dtype = _common_float(*xs, *ys)
    if dtype in _LOW_PRECISION:
        dtype = torch.float32
    xs = [x.to(dtype) for x in xs]
    ys = [y.to(dtype) for y in ys]
    if _use_native(xs[0]):
        return ops.cka_matrix(xs, ys, unbiased)
    return reference.cka_matrix(xs, ys, unbiased)
