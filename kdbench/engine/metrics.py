"""Evaluation metrics computed from logits: top-k accuracy, calibration, agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_correct(logits: Tensor, y: Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == y[:, None]).any(1).sum())


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): Σ_b |B_b|/N · |acc_b − conf_b|."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1, device=probs.device)
    # bin b holds confidences in (edges[b], edges[b+1]]
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    ece = torch.zeros((), dtype=torch.float64, device=probs.device)
    n = len(y)
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.sum() / n * (correct[m].mean() - conf[m].mean()).abs()
    return float(ece)


def classification_metrics(
    logits: Tensor, y: Tensor, ece_bins: int = 15, teacher_logits: Tensor | None = None
) -> dict[str, float]:
    """top1/top5 (top5 only with more than 5 classes), NLL, ECE, and teacher agreement."""
    logits = logits.float()
    n = len(y)
    out = {"top1": 100.0 * topk_correct(logits, y, 1) / n}
    if logits.shape[1] > 5:
        out["top5"] = 100.0 * topk_correct(logits, y, 5) / n
    out["nll"] = float(F.cross_entropy(logits, y))
    out["ece"] = 100.0 * expected_calibration_error(logits.softmax(1), y, ece_bins)
    if teacher_logits is not None:
        out["agreement"] = 100.0 * float((logits.argmax(1) == teacher_logits.argmax(1)).float().mean())
    return out
