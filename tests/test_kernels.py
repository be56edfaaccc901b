"""Correctness of the fused KD / DKD / CKA ops, on both backends and every device.

Structured after pytorch/extension-cpp's tests: one ``*_sample_inputs(device,
requires_grad)`` per op family feeds three checks, each parametrised over the devices
("cuda" is skipped when no GPU is visible, so the CUDA kernels are checked the first time
one is present):

- correctness: value and gradients against a float64 run of kdbench.kernels.reference
  (relative 1e-5);
- gradients: ``torch.autograd.gradcheck`` (float64);
- registration: ``torch.library.opcheck`` of the raw ``torch.ops.kdbench`` ops (schema,
  autograd registration, fake kernels, AOT dispatch).

Every test that takes the ``backend`` fixture runs once on the native extension (skipped,
with the reason, when it is not built or has no kernel for the device) and once on the
pure-PyTorch fallback. The detailed tests below the sample-input tests compare with
independent eager formulas (mdistiller's ``dkd_loss``; the textbook biased HSIC and Song et
al.'s unbiased HSIC) over large shapes and edge cases. Performance lives in benchmarks/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdbench.kernels as K
from kdbench.kernels import KernelInputError, ops, reference

BATCHES = [1, 7, 64, 1024]
CLASSES = [1, 2, 10, 100, 1000, 32000]
# The full grid minus the combinations too big for a quick float64 reference on 2 cores.
LOGIT_SHAPES = [(b, c) for b in BATCHES for c in CLASSES if b * c <= 2_100_000]

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]


@pytest.fixture(params=["native", "reference"])
def backend(request, monkeypatch):
    """Selects the backend of kdbench.kernels for the duration of a test."""
    if request.param == "native":
        if not ops.AVAILABLE:
            pytest.skip("native extension kdbench._C is not built (pip install -e . builds it)")
        monkeypatch.delenv("KDBENCH_KERNELS", raising=False)
    else:
        monkeypatch.setenv("KDBENCH_KERNELS", "reference")
    assert K.backend() == request.param
    return request.param


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device the inputs live on (each test also runs on CUDA when a GPU is present)."""
    return request.param


def _require_kernel(backend: str, device: str) -> None:
    """On the native backend, the extension must have a kernel for the device."""
    if backend == "native" and not ops.has_kernel(device):
        pytest.skip(f"kdbench._C was built without {device} kernels (needs nvcc at build time)")


def _logits(B, C, dtype=torch.float32, scale=3.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return s.to(device), t.to(device), y.to(device)


# --- sample inputs, one family per op (extension-cpp style) ----------------------------------


@dataclass
class Sample:
    """Arguments of one call of a kdbench.kernels function."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for a in self.args:
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, torch.Tensor))
        return out


def kd_sample_inputs(device: str, requires_grad: bool = False) -> list[Sample]:
    """(student, teacher, T) for kd_loss: shapes from 1 x 1 up, float64, T in {1, 2, 4}."""
    samples = []
    for i, (B, C, T) in enumerate([(1, 1, 4.0), (3, 2, 2.0), (4, 7, 1.0), (7, 10, 4.0), (16, 100, 2.0)]):
        s, t, _ = _logits(B, C, torch.float64, scale=1.0 + i, seed=i, device=device)
        # the teacher gets a gradient too in every other sample (teacher-training methods)
        samples.append(
            Sample((s.requires_grad_(requires_grad), t.requires_grad_(requires_grad and i % 2 == 0), T))
        )
    return samples


def dkd_sample_inputs(device: str, requires_grad: bool = False) -> list[Sample]:
    """(student, teacher, target, alpha, beta, T) for dkd_loss, C = 1 and 2 included."""
    samples = []
    cases = [(1, 1, 1.0, 8.0, 4.0), (3, 2, 1.5, 4.0, 2.0), (4, 7, 1.0, 8.0, 4.0), (16, 10, 0.5, 2.0, 1.0)]
    for i, (B, C, alpha, beta, T) in enumerate(cases):
        s, t, y = _logits(B, C, torch.float64, scale=1.0 + i, seed=10 + i, device=device)
        s.requires_grad_(requires_grad)
        t.requires_grad_(requires_grad and i % 2 == 1)
        samples.append(Sample((s, t, y, alpha, beta, T)))
    return samples


def cka_sample_inputs(device: str, requires_grad: bool = False) -> list[Sample]:
    """(xs, ys, unbiased) for cka_matrix: several layers, [n, ...] activations of any rank."""
    samples = []
    for i, (n, x_shapes, y_shapes) in enumerate(
        [(6, [(3, 2), (4,)], [(5,)]), (9, [(7,)], [(2, 3), (4,), (1,)]), (5, [(1,)], [(1,)])]
    ):
        g = torch.Generator().manual_seed(20 + i)
        xs = [torch.randn(n, *sh, generator=g, dtype=torch.float64).to(device) for sh in x_shapes]
        ys = [torch.randn(n, *sh, generator=g, dtype=torch.float64).to(device) for sh in y_shapes]
        # correlate a y with the first x so that the CKA values are not all near zero
        ys[0] = ys[0] + xs[0].flatten(1)[:, :1].reshape(n, *([1] * (ys[0].dim() - 1)))
        for x in xs:
            x.requires_grad_(requires_grad)
        for j, y in enumerate(ys):
            y.requires_grad_(requires_grad and j % 2 == 0)
        for unbiased in (False, True):
            samples.append(Sample((xs, ys, unbiased)))
    return samples


FAMILIES = {
    "kd": (kd_sample_inputs, K.kd_loss, reference.kd_loss),
    "dkd": (dkd_sample_inputs, K.dkd_loss, reference.dkd_loss),
    "cka": (cka_sample_inputs, K.cka_matrix, reference.cka_matrix),
}


def _to_cpu64(a):
    if isinstance(a, torch.Tensor):
        out = a.detach().cpu()
        return out.double().requires_grad_(a.requires_grad) if out.is_floating_point() else out
    if isinstance(a, (list, tuple)):
        return [_to_cpu64(x) for x in a]
    return a


def _value_and_grads(fn, sample: Sample):
    """fn(*args) and the gradients of a fixed random projection of it w.r.t. every input
    that requires grad."""
    out = fn(*sample.args, **sample.kwargs)
    leaves = [x for x in sample.tensors() if x.requires_grad]
    if not leaves:
        return out.detach(), []
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    return out.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_sample_inputs_correctness(backend, device, family, requires_grad):
    """Value and gradients match the float64 reference on the CPU (relative 1e-5)."""
    _require_kernel(backend, device)
    make, fn, ref_fn = FAMILIES[family]
    for sample in make(device, requires_grad=requires_grad):
        got, got_grads = _value_and_grads(fn, sample)
        assert got.device.type == device
        ref = Sample(tuple(_to_cpu64(a) for a in sample.args), sample.kwargs)
        want, want_grads = _value_and_grads(ref_fn, ref)
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-7 * scale)
        assert len(got_grads) == len(want_grads) == sum(x.requires_grad for x in sample.tensors())
        for a, b in zip(got_grads, want_grads, strict=True):
            gscale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-7 * gscale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_inputs_gradcheck(backend, device, family):
    _require_kernel(backend, device)
    make, fn, _ = FAMILIES[family]
    for sample in make(device, requires_grad=True):
        leaves = [x for x in sample.tensors() if x.requires_grad]

        def call(*tensors, sample=sample):
            it = iter(tensors)

            def swap(a):
                if isinstance(a, torch.Tensor):
                    return next(it) if a.requires_grad else a
                if isinstance(a, (list, tuple)):
                    return [swap(x) for x in a]
                return a

            return fn(*[swap(a) for a in sample.args], **sample.kwargs)

        assert torch.autograd.gradcheck(call, tuple(leaves))


def _raw_op_calls(family: str, sample: Sample) -> list[tuple]:
    """(op overload, args) of the torch.ops.kdbench calls a sample makes."""
    op = torch.ops.kdbench
    if family == "kd":
        s, t, T = sample.args
        return [(op.kd_loss_fwd.default, (s, t, float(T), t.requires_grad))]
    if family == "dkd":
        s, t, y, alpha, beta, T = sample.args
        return [(op.dkd_loss_fwd.default, (s, t, y, alpha, beta, T, t.requires_grad))]
    xs, ys, unbiased = sample.args
    fwd = op.cka_matrix_fwd.default
    with torch.no_grad():
        cka, kx, ky, nx, ny = fwd(xs, ys, unbiased)
    detached = ([x.detach() for x in xs], [y.detach() for y in ys])
    grad = torch.linspace(-1.0, 1.0, cka.numel(), dtype=cka.dtype, device=cka.device).view(cka.shape)
    bwd_args = (grad, *detached, kx, ky, cka, nx, ny, unbiased, True, True)
    return [(fwd, (xs, ys, unbiased)), (op.cka_matrix_bwd.default, bwd_args)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_inputs_opcheck(device, family):
    """Schemas, autograd registrations, fake kernels and AOT dispatch of the native ops."""
    if not ops.AVAILABLE:
        pytest.skip("native extension kdbench._C is not built (pip install -e . builds it)")
    _require_kernel("native", device)
    make = FAMILIES[family][0]
    samples = make(device, requires_grad=True) + make(device, requires_grad=False)
    for sample in samples:
        for overload, args in _raw_op_calls(family, sample):
            torch.library.opcheck(overload, args)
    s, _, _ = _logits(4, 7, torch.float64, device=device)
    torch.library.opcheck(
        torch.ops.kdbench.scale_grad.default, (s, torch.tensor(0.5, dtype=s.dtype, device=device))
    )


def _loss_and_grads(fn, s, t, *args, teacher_grad=False):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t, *args)
    loss.backward()
    return loss.detach(), s.grad, (t.grad if teacher_grad else None)


def _assert_matches_float64(fn, ref_fn, s, t, *args, grad_scale, teacher_grad=False, slack=1.0):
    """fn on (s, t) vs ref_fn on float64 CPU copies: loss and gradients (tolerances * slack)."""
    loss, gs, gt = _loss_and_grads(fn, s, t, *args, teacher_grad=teacher_grad)
    assert loss.device == s.device and gs.device == s.device
    loss, gs, gt = loss.cpu(), gs.cpu(), (gt.cpu() if teacher_grad else None)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    loss64, gs64, gt64 = _loss_and_grads(
        ref_fn, s.double().cpu(), t.double().cpu(), *cpu_args, teacher_grad=teacher_grad
    )
    exact = s.dtype == torch.float64
    rtol, atol = (1e-9, 1e-12) if exact else (2e-5, 2e-5)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), loss64, rtol=rtol, atol=atol * max(1.0, abs(loss64.item())))
    gatol = (1e-12 if exact else 2e-6) * grad_scale * slack
    torch.testing.assert_close(gs.double(), gs64, rtol=0, atol=gatol)
    if teacher_grad:
        # the teacher gradient carries (t - s) / T, which is large for large logits
        tatol = (1e-12 if exact else 2e-6) * max(grad_scale, gt64.abs().max().item()) * slack
        torch.testing.assert_close(gt.double(), gt64, rtol=0, atol=tatol)


# --- KD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,C", LOGIT_SHAPES)
def test_kd_matches_float64_reference(backend, device, B, C):
    _require_kernel(backend, device)
    s, t, _ = _logits(B, C, device=device)
    _assert_matches_float64(K.kd_loss, reference.kd_loss, s, t, 4.0, grad_scale=4.0 / B)


@pytest.mark.parametrize("B,C", [(7, 10), (64, 1000), (1, 32000)])
def test_kd_float64_and_teacher_grad(backend, device, B, C):
    _require_kernel(backend, device)
    s, t, _ = _logits(B, C, torch.float64, device=device)
    _assert_matches_float64(K.kd_loss, reference.kd_loss, s, t, 2.0, grad_scale=2.0 / B, teacher_grad=True)


@pytest.mark.parametrize("B,C", [(7, 10), (64, 1000), (7, 32000)])
def test_kd_large_magnitude_logits(backend, device, B, C):
    """Logits of ±1e4 overflow a naive softmax; the loss must stay finite and exact."""
    _require_kernel(backend, device)
    s, t, _ = _logits(B, C, device=device)
    s, t = (s / 3).clamp(-1, 1) * 1e4, (t / 3).clamp(-1, 1) * 1e4
    _assert_matches_float64(K.kd_loss, reference.kd_loss, s, t, 4.0, grad_scale=4.0 / B, teacher_grad=True)


def test_kd_big_batch_many_classes(backend, device):
    """B = 1024, C = 32000 in float32, against a float64 reference on a slice of rows."""
    _require_kernel(backend, device)
    s, t, _ = _logits(1024, 32000)
    loss, gs, _ = _loss_and_grads(K.kd_loss, s.to(device), t.to(device), 4.0)
    loss, gs = loss.cpu(), gs.cpu()
    rows = slice(0, 64)
    loss64, gs64, _ = _loss_and_grads(reference.kd_loss, s[rows].double(), t[rows].double(), 4.0)
    # the loss is a batch mean and the gradient carries 1/B: rescale the slice's to 1024 rows
    full64 = reference.kd_loss(s.double(), t.double(), 4.0)
    torch.testing.assert_close(loss.double(), full64, rtol=2e-5, atol=0)
    torch.testing.assert_close(gs[rows].double() * 1024 / 64, gs64, rtol=0, atol=2e-6 * 4.0 / 64)


# --- DKD -----------------------------------------------------------------------------------


def mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (Zhao et al. 2022, megvii-research/mdistiller, mdistiller/
    distillers/DKD.py), written out eagerly with its helper functions inlined."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.0, 2.0)])
def test_dkd_matches_mdistiller(backend, device, alpha, beta, T):
    _require_kernel(backend, device)
    s, t, y = _logits(16, 10, torch.float64, scale=2.0, seed=3, device=device)
    want_s = s.clone().requires_grad_(True)
    want = mdistiller_dkd_loss(want_s, t, y, alpha, beta, T)
    want.backward()
    got_s = s.clone().requires_grad_(True)
    got = K.dkd_loss(got_s, t, y, alpha, beta, T)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_s.grad, want_s.grad, rtol=1e-8, atol=1e-12)


def test_dkd_golden_value(backend, device):
    _require_kernel(backend, device)
    s = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]], dtype=torch.float64, device=device)
    t = torch.tensor([[3.0, 0.5, 0.2], [0.1, 1.5, 0.3]], dtype=torch.float64, device=device)
    y = torch.tensor([0, 2], device=device)
    want = mdistiller_dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(K.dkd_loss(s, t, y, 1.0, 8.0, 4.0), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("B,C", LOGIT_SHAPES)
def test_dkd_matches_float64_reference(backend, device, B, C):
    _require_kernel(backend, device)
    s, t, y = _logits(B, C, device=device)
    _assert_matches_float64(K.dkd_loss, reference.dkd_loss, s, t, y, 1.0, 8.0, 4.0, grad_scale=9 * 4.0 / B)


@pytest.mark.parametrize("B,C", [(7, 10), (64, 1000), (7, 32000), (5, 1), (5, 2)])
def test_dkd_large_magnitude_and_teacher_grad(backend, device, B, C):
    _require_kernel(backend, device)
    s, t, y = _logits(B, C, device=device)
    s, t = (s / 3).clamp(-1, 1) * 1e4, (t / 3).clamp(-1, 1) * 1e4
    # The float32 fallback works with log-probabilities of magnitude ~1e3 here, so its
    # gradients carry ~1e-4 relative rounding error; the native kernel stays at ~1e-6.
    _assert_matches_float64(
        K.dkd_loss,
        reference.dkd_loss,
        s,
        t,
        y,
        1.0,
        8.0,
        4.0,
        grad_scale=9 * 4.0 / B,
        teacher_grad=True,
        slack=1.0 if backend == "native" else 100.0,
    )
    s, t, y = _logits(B, C, torch.float64, device=device)
    _assert_matches_float64(
        K.dkd_loss, reference.dkd_loss, s, t, y, 2.0, 3.0, 1.5, grad_scale=5 * 1.5 / B, teacher_grad=True
    )


# --- gradcheck -------------------------------------------------------------------------------


@pytest.mark.parametrize("B,C", [(1, 1), (3, 2), (4, 7)])
def test_gradcheck_losses(backend, device, B, C):
    _require_kernel(backend, device)
    s, t, y = _logits(B, C, torch.float64, scale=1.0, device=device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: K.kd_loss(a, b, 2.0), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: K.dkd_loss(a, b, y, 1.5, 4.0, 2.0), (s, t))


@pytest.mark.parametrize("unbiased", [False, True])
def test_gradcheck_cka(backend, device, unbiased):
    _require_kernel(backend, device)
    g = torch.Generator().manual_seed(1)
    xs = [
        torch.randn(6, 3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_(True),
        torch.randn(6, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True),
    ]
    ys = [torch.randn(6, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)]
    assert torch.autograd.gradcheck(lambda *z: K.cka_matrix(z[:2], z[2:], unbiased), (*xs, *ys))
    frozen = [y.detach() for y in ys]
    assert torch.autograd.gradcheck(lambda *z: K.cka_matrix(z, frozen, unbiased), tuple(xs))


# --- CKA -------------------------------------------------------------------------------------


def independent_cka(x, y, unbiased):
    """Linear CKA of one pair from the textbook formulas, in float64."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = x.shape[0]
    k, lm = x @ x.T, y @ y.T
    if not unbiased:
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n

        def hsic(a, b):
            return torch.trace(h @ a @ h @ b) / (n - 1) ** 2
    else:

        def hsic(a, b):  # Song et al. (2012), eq. (5)
            a = a - torch.diag(torch.diag(a))
            b = b - torch.diag(torch.diag(b))
            one = torch.ones(n, dtype=torch.float64)
            val = torch.trace(a @ b) + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
            val = val - 2.0 / (n - 2) * (one @ a @ b @ one)
            return val / (n * (n - 3))

    return hsic(k, lm) / torch.sqrt(hsic(k, k) * hsic(lm, lm))


CKA_SHAPES = [  # (n, L_x, L_y, d)
    (4, 1, 1, 1),
    (7, 2, 3, 10),
    (64, 3, 2, 100),
    (64, 1, 4, 1000),
    (256, 2, 2, 64),
    (7, 1, 1, 4096),
]


@pytest.mark.parametrize("n,lx,ly,d", CKA_SHAPES)
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_independent_formula(backend, device, n, lx, ly, d, unbiased):
    _require_kernel(backend, device)
    g = torch.Generator().manual_seed(n + d)
    xs = [torch.randn(n, d + i, generator=g) for i in range(lx)]
    # correlated ys so that the CKA values are not all near zero
    ys = [torch.cat([xs[0][:, : min(d, 3)] * (j + 1), torch.randn(n, d, generator=g)], 1) for j in range(ly)]
    want = torch.stack([torch.stack([independent_cka(x, y, unbiased) for y in ys]) for x in xs])
    xs, ys = [x.to(device) for x in xs], [y.to(device) for y in ys]
    got = K.cka_matrix(xs, ys, unbiased=unbiased)
    assert got.shape == (lx, ly) and got.dtype == torch.float32 and got.device.type == device
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=2e-5)
    got64 = K.cka_matrix([x.double() for x in xs], [y.double() for y in ys], unbiased=unbiased)
    torch.testing.assert_close(got64.cpu(), want, rtol=1e-9, atol=1e-11)


def test_cka_self_similarity_is_one_and_grads_match(backend, device):
    _require_kernel(backend, device)
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(32, 8, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
        for _ in range(3)
    ]
    w = torch.arange(9.0, dtype=torch.float64, device=device).view(3, 3)
    for unbiased in (False, True):
        m = K.cka_matrix(xs, xs, unbiased=unbiased)
        torch.testing.assert_close(torch.diagonal(m), torch.ones(3, dtype=torch.float64, device=device))
        (m * w).sum().backward()
        got = [x.grad.clone() for x in xs]
        for x in xs:
            x.grad = None
        r = reference.cka_matrix(xs, xs, unbiased=unbiased)
        (r * w).sum().backward()
        for a, x in zip(got, xs, strict=True):
            torch.testing.assert_close(a, x.grad, rtol=1e-9, atol=1e-12)
            x.grad = None


# --- dtypes, layouts, bad inputs -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_accumulate_in_float32(backend, device, dtype):
    _require_kernel(backend, device)
    s, t, y = _logits(8, 100, dtype, device=device)
    for fn, args in ((K.kd_loss, (4.0,)), (K.dkd_loss, (y, 1.0, 8.0, 4.0))):
        loss, gs, _ = _loss_and_grads(fn, s, t, *args)
        assert loss.dtype == torch.float32 and gs.dtype == dtype
        want, want_g, _ = _loss_and_grads(fn, s.float(), t.float(), *args)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs.float(), want_g, rtol=2e-2, atol=1e-4)
    xs = [torch.randn(16, 20).to(device=device, dtype=dtype)]
    assert K.cka_matrix(xs, xs).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision_logits(backend, device, dtype):
    """Under autocast the fused losses take the bf16 / fp16 logits a model returns (teacher
    logits in float32 or in the same dtype), accumulate in float32 and return a float32
    loss. Loss and weight gradient match the float32 run within 1e-2 (relative; bf16 keeps
    8 significant bits of each logit, measured 1.7e-3 and 4.2e-3)."""
    _require_kernel(backend, device)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(32, 10).to(device)
    with torch.no_grad():
        model.weight.copy_(torch.randn(10, 32, generator=g) * 0.3)
    x = torch.randn(16, 32, generator=g).to(device)
    t = (torch.randn(16, 10, generator=g) * 3).to(device)
    y = torch.randint(0, 10, (16,), generator=g).to(device)

    def run(autocast: bool):
        model.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            s = model(x)
            assert s.dtype == (dtype if autocast else torch.float32)
            losses = [
                K.kd_loss(s, t),
                K.dkd_loss(s, t, y),
                K.kd_loss(s, t.to(s.dtype)),
                K.dkd_loss(s, t.to(s.dtype), y, 1.0, 2.0, 4.0),
            ]
        assert all(loss.dtype == torch.float32 for loss in losses)
        sum(losses).backward()
        return torch.stack([loss.detach() for loss in losses]), model.weight.grad.clone()

    got, got_grad = run(True)
    want, want_grad = run(False)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-2 * want_grad.abs().max().item())


def test_non_contiguous_inputs(backend, device):
    _require_kernel(backend, device)
    s, t, y = _logits(16, 64, device=device)
    wide = torch.zeros(16, 128, device=device)
    wide[:, ::2] = s
    s_nc, t_nc = wide[:, ::2], t.T.contiguous().T
    assert not s_nc.is_contiguous() and not t_nc.is_contiguous()
    for fn, args in ((K.kd_loss, (4.0,)), (K.dkd_loss, (y, 1.0, 8.0, 4.0))):
        want = _loss_and_grads(fn, s, t, *args)
        got = _loss_and_grads(fn, s_nc, t_nc, *args)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    x = torch.randn(10, 6, 5, device=device)
    want_cka = K.cka_matrix([x.transpose(1, 2).contiguous()], [x])
    torch.testing.assert_close(K.cka_matrix([x.transpose(1, 2)], [x]), want_cka)


def test_mixed_dtypes_are_promoted(backend, device):
    _require_kernel(backend, device)
    s, t, _ = _logits(4, 10, device=device)
    assert K.kd_loss(s, t.double()).dtype == torch.float64
    assert K.cka_matrix([s], [t.double()]).dtype == torch.float64


def test_bad_inputs_raise_clear_errors(backend, device):
    _require_kernel(backend, device)
    s, t, y = _logits(4, 10, device=device)
    with pytest.raises(KernelInputError, match="same shape"):
        K.kd_loss(s, t[:, :5])
    with pytest.raises(KernelInputError, match=r"\[B, C\]"):
        K.kd_loss(s[0], t[0])
    with pytest.raises(KernelInputError, match="non-empty"):
        K.kd_loss(s[:0], t[:0])
    with pytest.raises(KernelInputError, match="positive"):
        K.kd_loss(s, t, T=0.0)
    with pytest.raises(KernelInputError, match="floating"):
        K.kd_loss(s.long(), t.long())
    with pytest.raises(KernelInputError, match="target"):
        K.dkd_loss(s, t, y[:2])
    with pytest.raises(KernelInputError, match="integer"):
        K.dkd_loss(s, t, y.float())
    with pytest.raises((KernelInputError, RuntimeError), match="class"):
        K.dkd_loss(s, t, torch.tensor([0, 1, 2, 10], device=device))
        if device == "cuda":
            torch.cuda.synchronize()
    with pytest.raises(KernelInputError, match="at least 4"):
        K.cka_matrix([s[:3]], [t[:3]], unbiased=True)
    with pytest.raises(KernelInputError, match="same number of samples"):
        K.cka_matrix([s], [t[:3]])
    with pytest.raises(KernelInputError, match="at least one"):
        K.cka_matrix([], [t])


def test_tiny_inputs(backend, device):
    """B = 1, C = 1 and n < 4 (biased) give well-defined values, not NaN."""
    _require_kernel(backend, device)
    s, t, y = _logits(1, 1, device=device)
    assert K.kd_loss(s, t).item() == pytest.approx(0.0, abs=1e-7)
    assert K.dkd_loss(s, t, y).item() == pytest.approx(0.0, abs=1e-7)
    x = torch.randn(3, 5, device=device)
    assert torch.isfinite(K.cka_matrix([x], [x])).all()
    assert torch.isfinite(K.cka_matrix([x[:1]], [x[:1]])).all()


# --- torch.compile and the fallback ----------------------------------------------------------


def _compiled_step(backend_name, device="cpu"):
    y = torch.tensor([1, 0, 3, 2], device=device)

    def f(a, b, x):
        return K.kd_loss(a, b, 4.0) + K.dkd_loss(a, b, y, 1.0, 8.0, 4.0) + K.cka_matrix([x], [a, b]).sum()

    s, t, _ = _logits(4, 6, device=device)
    x = torch.randn(4, 3, 2, device=device)
    cf = torch.compile(f, fullgraph=True, backend=backend_name)
    ins = [s.clone().requires_grad_(True), t, x.clone().requires_grad_(True)]
    out = cf(*ins)
    out.backward()
    ref_ins = [s.clone().requires_grad_(True), t, x.clone().requires_grad_(True)]
    want = f(*ref_ins)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(ins[0].grad, ref_ins[0].grad)
    torch.testing.assert_close(ins[2].grad, ref_ins[2].grad)


def test_torch_compile_fullgraph_aot(backend, device):
    """fake kernels + autograd registrations trace without graph breaks (AOTAutograd)."""
    _require_kernel(backend, device)
    torch._dynamo.reset()
    _compiled_step("aot_eager", device)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor(backend, device):
    _require_kernel(backend, device)
    torch._dynamo.reset()
    _compiled_step("inductor", device)


def test_cka_device_generic_path_on_cpu():
    """The device-generic CKA code (what CUDA runs: full Gram GEMMs, scatter-based packing)
    matches the reference on CPU too (KDBENCH_CKA_GENERIC=1 selects it; read once per
    process, hence the subprocess)."""
    if not ops.AVAILABLE:
        pytest.skip("native extension kdbench._C is not built (pip install -e . builds it)")
    code = (
        "import torch, kdbench.kernels as K\n"
        "from kdbench.kernels import reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):\n"
        "    for unbiased in (False, True):\n"
        "        xs = [torch.randn(9, 3, 2, generator=g, dtype=dtype) + 2]\n"
        "        xs.append(torch.randn(9, 5, generator=g, dtype=dtype))\n"
        "        ys = [torch.randn(9, 4, generator=g, dtype=dtype)]\n"
        "        xs = [x.requires_grad_(True) for x in xs]\n"
        "        ys = [y.requires_grad_(True) for y in ys]\n"
        "        w = torch.tensor([[0.7], [-1.3]], dtype=dtype)\n"
        "        got = K.cka_matrix(xs, ys, unbiased)\n"
        "        gg = torch.autograd.grad((got * w).sum(), xs + ys)\n"
        "        want = reference.cka_matrix(xs, ys, unbiased)\n"
        "        wg = torch.autograd.grad((want * w).sum(), xs + ys)\n"
        "        torch.testing.assert_close(got, want, rtol=tol, atol=tol)\n"
        "        for a, b in zip(gg, wg):\n"
        "            torch.testing.assert_close(a, b, rtol=tol, atol=tol)\n"
        "print('generic ok')\n"
    )
    env = {**os.environ, "KDBENCH_CKA_GENERIC": "1"}
    env.pop("KDBENCH_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert "generic ok" in out.stdout


def test_import_without_extension_falls_back():
    code = (
        "import sys; sys.modules['kdbench._C'] = None\n"
        "import torch, kdbench.kernels as K\n"
        "assert K.backend() == 'reference', K.backend()\n"
        "s = torch.randn(3, 5, requires_grad=True)\n"
        "K.kd_loss(s, torch.randn(3, 5)).backward()\n"
        "assert s.grad is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backward_scaling_and_retained_graph(backend, device):
    """The stored gradient is scaled by the incoming gradient and survives retain_graph."""
    _require_kernel(backend, device)
    s, t, y = _logits(8, 50, device=device)
    want = _loss_and_grads(lambda a, b: 2.5 * reference.kd_loss(a, b, 4.0), s, t)[1]
    got = _loss_and_grads(lambda a, b: 2.5 * K.kd_loss(a, b, 4.0), s, t)[1]
    torch.testing.assert_close(got, want)
    x = s.clone().requires_grad_(True)
    loss = K.dkd_loss(x, t, y)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 3 * once)
    (g,) = torch.autograd.grad(K.kd_loss(x, t), x)
    g.zero_()  # a caller writing into a returned gradient must not corrupt anything else
    torch.testing.assert_close(torch.autograd.grad(K.kd_loss(x, t), x)[0], want / 2.5)


@pytest.mark.skipif(K.backend() != "native", reason="the native extension is not built")
def test_cka_layers_run_on_several_threads_with_the_single_thread_numbers():
    """The CPU op splits its layers over threads (at::parallel_for, built with -fopenmp): the
    forward and the backward (worker threads start outside the caller's no-grad mode) give the
    1-thread results."""
    saved = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 40, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    ys = [torch.randn(32, 24, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = K.cka_matrix(xs, ys)
            grads = torch.autograd.grad(m.square().sum(), xs + ys)
            out[threads] = (m.detach(), grads)
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(out[2][0], out[1][0], rtol=0, atol=1e-12)
    for a, b in zip(out[2][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    want = reference.cka_matrix([x.detach() for x in xs], [y.detach() for y in ys])
    torch.testing.assert_close(out[1][0], want)


@pytest.mark.skipif(K.backend() != "native", reason="the native extension is not built")
@pytest.mark.parametrize("gram", ["avx2", "avx512", "blas"])
def test_cka_gram_kernels_match_the_reference(gram):
    """Every kernel of the float32 CPU Grams (chosen once per process, KDBENCH_GRAM forces
    one) gives the reference's values and gradients, over several feature chunks and row
    panels (n = 150 leaves partial panels and tiles) and with a mean far from zero."""
    if gram == "avx512" and "avx512f" not in _cpu_flags():
        pytest.skip("the CPU has no AVX-512F")
    code = (
        "import torch, kdbench.kernels as K\n"
        "from kdbench.kernels import reference\n"
        "info = K.gram_backend()\n"
        f"assert info['gram'] in ({gram!r}, 'blas') and info['reason'], info\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for unbiased in (False, True):\n"
        "    xs = [torch.randn(150, 600, generator=g) + 3, torch.randn(150, 7, 9, generator=g)]\n"
        "    ys = [torch.randn(150, 300, generator=g)]\n"
        "    ys[0][:, :20] += xs[0][:, :20]\n"
        "    xs = [x.requires_grad_(True) for x in xs]\n"
        "    got = K.cka_matrix(xs, ys, unbiased)\n"
        "    gg = torch.autograd.grad(got.sum(), xs)\n"
        "    dx = [x.detach().double().requires_grad_(True) for x in xs]\n"
        "    want = reference.cka_matrix(dx, [y.double() for y in ys], unbiased)\n"
        "    wg = torch.autograd.grad(want.sum(), dx)\n"
        "    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)\n"
        "    for a, b in zip(gg, wg):\n"
        "        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-6)\n"
        "print('gram ok', info['gram'])\n"
    )
    env = {**os.environ, "KDBENCH_GRAM": gram}
    env.pop("KDBENCH_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert "gram ok" in out.stdout


def test_gram_backend_is_recorded(backend):
    info = K.gram_backend()
    assert set(info) == {"gram", "reason"} and info["reason"]
    assert info["gram"] in (("avx2", "avx512", "blas") if backend == "native" else ("reference",))
    if backend == "native" and not os.environ.get("KDBENCH_GRAM"):
        flags = _cpu_flags()  # the choice is by CPU capability, so it can be checked
        want = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "blas"
        assert info["gram"] == want, info


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def test_bench_says_where_it_ran(tmp_path, capsys):
    """Every `kdbench bench` output names the machine and software: the text header and
    each JSON row (CPU model and capability, BLAS, torch, threads, git sha, Gram kernel)."""
    from kdbench import bench

    out = tmp_path / "bench.json"
    bench.bench_command(quick=True, json=out, threads="1", only="cka")
    text = capsys.readouterr().out
    for key in ("cpu=", "capability=", "blas=", "torch=", "threads=", "git=", "cka_gram="):
        assert key in text, (key, text)
    assert torch.__version__ in text and str(torch.backends.cpu.get_cpu_capability()) in text
    rows = json.loads(out.read_text())
    assert rows
    for row in rows:
        env = row["environment"]
        for key in ("cpu", "cpu_capability", "blas", "torch", "threads", "git_sha", "kernels"):
            assert key in env, key
        assert env["threads"] == row["threads"] == 1
        assert env["torch"] == torch.__version__ and env["cka_gram"]["gram"]
