"""Pure-PyTorch reference implementations of the fused ops (the fallback backend).

These are written for clarity and numerical safety, not speed; the native ops must match
them (see tests/test_kernels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0) -> Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    s = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    t = teacher_logits.to(s.dtype)
    log_p_s = F.log_softmax(s / T, dim=1)
    log_p_t = F.log_softmax(t / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    return kl.mean() * T * T


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, each * T^2, batch mean.

    Same quantity as mdistiller's ``dkd_loss``, but the non-target classes are selected
    exactly (mdistiller subtracts 1000 from the target logit) and the binary target/rest
    distributions are formed in log space, so it stays finite for large logits.
    """
    s = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    t = teacher_logits.to(s.dtype)
    B, C = s.shape
    if C == 1:  # no non-target class: both terms are zero
        return (s.sum() + t.sum()) * 0.0
    gt = F.one_hot(target, C).to(torch.bool)
    a, b = s / T, t / T
    a_rest = a[~gt].view(B, C - 1)
    b_rest = b[~gt].view(B, C - 1)
    # binary (target vs the rest) distributions: p(target) = sigmoid(u)
    u = a[gt] - torch.logsumexp(a_rest, 1)
    v = b[gt] - torch.logsumexp(b_rest, 1)
    log_bs = torch.stack([-F.softplus(-u), -F.softplus(u)], 1)
    log_bt = torch.stack([-F.softplus(-v), -F.softplus(v)], 1)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1).mean() * T * T
    # distributions over the non-target classes
    log_q_s = F.log_softmax(a_rest, dim=1)
    log_q_t = F.log_softmax(b_rest, dim=1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean() * T * T
    return alpha * tckd + beta * nckd


def _centered_gram(x: Tensor) -> Tensor:
    x = x.flatten(1)
    g = x @ x.T
    n = g.shape[0]
    h = torch.eye(n, dtype=g.dtype, device=g.device) - 1.0 / n
    return h @ g @ h


def _unbiased_gram(x: Tensor) -> Tensor:
    """The U-centred Gram of Nguyen et al. (2021) / Song et al. (2012)."""
    x = x.flatten(1)
    n = x.shape[0]
    g = x @ x.T
    g = g - torch.diag(torch.diag(g))
    means = g.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    g = g - means[:, None] - means[None, :]
    return g - torch.diag(torch.diag(g))


def cka_matrix(xs: list[Tensor], ys: list[Tensor], unbiased: bool = False) -> Tensor:
    """Linear CKA between every (x in xs, y in ys); each is [n, ...], flattened per sample."""
    if not xs or not ys:
        raise ValueError("cka_matrix needs at least one activation in xs and in ys")
    n = xs[0].shape[0]
    for a in list(xs) + list(ys):
        if a.shape[0] != n:
            raise ValueError(f"all activations need the same number of samples; got {a.shape[0]} and {n}")
    if unbiased and n < 4:
        raise ValueError(f"the unbiased CKA estimator needs at least 4 samples, got {n}")
    gram = _unbiased_gram if unbiased else _centered_gram
    gx = torch.stack([gram(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x) for x in xs])
    gy = torch.stack([gram(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y) for y in ys])
    gx = gx.to(torch.promote_types(gx.dtype, gy.dtype))
    gy = gy.to(gx.dtype)
    fx = gx.flatten(1)
    fy = gy.flatten(1)
    hsic = fx @ fy.T
    nx = (fx * fx).sum(1).clamp_min(0).sqrt()
    ny = (fy * fy).sum(1).clamp_min(0).sqrt()
    return hsic / (nx[:, None] * ny[None, :]).clamp_min(torch.finfo(hsic.dtype).tiny)
