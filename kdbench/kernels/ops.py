"""torch.library glue for the native ops of ``kdbench._C``.

The C++ side (csrc/ops.cpp) defines the schemas and the CPU / CUDA kernels in the
``kdbench`` namespace. This module loads the library and adds what torch needs around them:
fake kernels (shapes for ``torch.compile`` / meta tracing) and autograd formulas. The
forward ops return the loss *and* its gradient, computed in the same pass, so backward
only scales the stored gradient.

Importing this module never fails: :data:`AVAILABLE` says whether the library loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor


def _load() -> bool:
    try:
        importlib.import_module("kdbench._C")
    except ImportError:
        return False
    return hasattr(torch.ops.kdbench, "kd_loss_fwd")


AVAILABLE: bool = _load()


def has_kernel(device_type: str) -> bool:
    """Whether the native ops have a kernel for this device type ("cpu", "cuda", ...)."""
    if not AVAILABLE:
        return False
    if device_type == "cpu":
        return True
    if device_type != "cuda":
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("kdbench::kd_loss_fwd", "CUDA")


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if AVAILABLE:

    @torch.library.register_fake("kdbench::kd_loss_fwd")
    def _kd_loss_fwd_fake(s: Tensor, t: Tensor, T: float, teacher_grad: bool):
        grad_t = s.new_empty(s.shape) if teacher_grad else s.new_empty((0,))
        return s.new_empty((), dtype=_loss_dtype(s.dtype)), s.new_empty(s.shape), grad_t

    @torch.library.register_fake("kdbench::dkd_loss_fwd")
    def _dkd_loss_fwd_fake(s, t, target, alpha, beta, T, teacher_grad):
        grad_t = s.new_empty(s.shape) if teacher_grad else s.new_empty((0,))
        return s.new_empty((), dtype=_loss_dtype(s.dtype)), s.new_empty(s.shape), grad_t

    @torch.library.register_fake("kdbench::scale_grad")
    def _scale_grad_fake(grad: Tensor, g: Tensor):
        return grad.new_empty(grad.shape)

    @torch.library.register_fake("kdbench::cka_matrix_fwd")
    def _cka_matrix_fwd_fake(xs: Sequence[Tensor], ys: Sequence[Tensor], unbiased: bool):
        x0, n = xs[0], xs[0].shape[0]
        m = n * (n + 1) // 2  # packed upper triangle of each centred Gram
        return (
            x0.new_empty((len(xs), len(ys))),
            x0.new_empty((len(xs), m)),
            x0.new_empty((len(ys), m)),
            x0.new_empty((len(xs),)),
            x0.new_empty((len(ys),)),
        )

    @torch.library.register_fake("kdbench::cka_matrix_bwd")
    def _cka_matrix_bwd_fake(grad, xs, ys, kx, ky, cka, nx, ny, unbiased, need_x, need_y):
        dxs = [x.new_empty(x.shape) for x in xs] if need_x else []
        dys = [y.new_empty(y.shape) for y in ys] if need_y else []
        return dxs, dys

    # --- autograd: scale the gradient stored by the forward pass ---------------------------

    def _loss_setup_context(ctx, inputs, output) -> None:
        _, grad_s, grad_t = output
        ctx.teacher_grad = bool(inputs[-1])
        # the gradient outputs are not part of the loss: no zero B x C grads for them
        ctx.mark_non_differentiable(grad_s, grad_t)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_s, grad_t)

    def _scaled(stored: Tensor, g_loss: Tensor) -> Tensor:
        # loss.backward() sends exactly 1: hand back the stored gradient itself and skip a
        # B x C pass. This is safe: autograd never writes into an incoming gradient, and
        # when the graph is retained AccumulateGrad clones it instead of adopting it (the
        # saved copy is still referenced), so the stored gradient stays intact. Only eager
        # CPU scalars are inspected; traced (compiled) backward graphs always scale.
        if (
            type(g_loss) is torch.Tensor
            and g_loss.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and g_loss.numel() == 1
            and g_loss.item() == 1.0
        ):
            return stored
        return torch.ops.kdbench.scale_grad(stored, g_loss)

    def _kd_backward(ctx, g_loss, _g_grad_s, _g_grad_t):
        if g_loss is None:
            return None, None, None, None
        grad_s, grad_t = ctx.saved_tensors
        return _scaled(grad_s, g_loss), (_scaled(grad_t, g_loss) if ctx.teacher_grad else None), None, None

    def _dkd_backward(ctx, g_loss, _g_grad_s, _g_grad_t):
        if g_loss is None:
            return (None,) * 7
        grad_s, grad_t = ctx.saved_tensors
        grad_t = _scaled(grad_t, g_loss) if ctx.teacher_grad else None
        return _scaled(grad_s, g_loss), grad_t, None, None, None, None, None

    torch.library.register_autograd("kdbench::kd_loss_fwd", _kd_backward, setup_context=_loss_setup_context)
    torch.library.register_autograd("kdbench::dkd_loss_fwd", _dkd_backward, setup_context=_loss_setup_context)

    def _cka_setup_context(ctx, inputs, output) -> None:
        xs, ys, unbiased = inputs
        cka, kx, ky, nx, ny = output
        ctx.mark_non_differentiable(kx, ky, nx, ny)
        ctx.set_materialize_grads(False)
        ctx.n_x = len(xs)
        ctx.unbiased = unbiased
        ctx.need_x = any(x.requires_grad for x in xs)
        ctx.need_y = any(y.requires_grad for y in ys)
        ctx.save_for_backward(*xs, *ys, kx, ky, cka, nx, ny)

    def _cka_backward(ctx, g_cka, _g_kx, _g_ky, _g_nx, _g_ny):
        saved = ctx.saved_tensors
        if g_cka is None:
            return [None] * ctx.n_x, [None] * (len(saved) - 5 - ctx.n_x), None
        xs, ys = list(saved[: ctx.n_x]), list(saved[ctx.n_x : -5])
        kx, ky, cka, nx, ny = saved[-5:]
        dxs, dys = torch.ops.kdbench.cka_matrix_bwd(
            g_cka, xs, ys, kx, ky, cka, nx, ny, ctx.unbiased, ctx.need_x, ctx.need_y
        )
        n_y = len(saved) - 5 - ctx.n_x
        grad_xs = list(dxs) if ctx.need_x else [None] * ctx.n_x
        grad_ys = list(dys) if ctx.need_y else [None] * n_y
        return grad_xs, grad_ys, None

    torch.library.register_autograd(
        "kdbench::cka_matrix_fwd", _cka_backward, setup_context=_cka_setup_context
    )


def kd_loss(s: Tensor, t: Tensor, T: float) -> Tensor:
    """Native Hinton KD loss; inputs already validated (see kdbench.kernels.kd_loss)."""
    teacher_grad = t.requires_grad and torch.is_grad_enabled()
    return torch.ops.kdbench.kd_loss_fwd(s, t, float(T), teacher_grad)[0]


def dkd_loss(s: Tensor, t: Tensor, target: Tensor, alpha: float, beta: float, T: float) -> Tensor:
    """Native decoupled KD loss; inputs already validated (see kdbench.kernels.dkd_loss)."""
    teacher_grad = t.requires_grad and torch.is_grad_enabled()
    return torch.ops.kdbench.dkd_loss_fwd(s, t, target, float(alpha), float(beta), float(T), teacher_grad)[0]


def cka_matrix(xs: list[Tensor], ys: list[Tensor], unbiased: bool) -> Tensor:
    """Native CKA matrix; inputs already validated (see kdbench.kernels.cka_matrix)."""
    return torch.ops.kdbench.cka_matrix_fwd(xs, ys, bool(unbiased))[0]
