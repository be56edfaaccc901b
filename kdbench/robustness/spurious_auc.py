"""Spurious mAUC (Neuhaus et al., ICCV 2023, "Spurious Features Everywhere — Large-Scale Detection
of Harmful Spurious Features in ImageNet"; reference: YanNeu/spurious_imagenet,
``dataset/spurious_score.py``, ``calculate_spurious_score``).

A *spurious-only* image of class k shows the feature a classifier associates with k but not the
class object. For each class k that has such images, score every test image of class k and
every spurious-only image of k by the model's softmax probability of k and take the ROC AUC of
test images (positives) against spurious-only images (negatives). The spurious mAUC is the mean
over those classes: 1 when the model never mistakes the feature for the object, 0.5 when it
cannot tell them apart, below 0.5 when the feature alone convinces it more than the object.

Details, as in the reference: the score is the softmax probability (not the logit) of class k;
classes are those with spurious-only images (a class without test images is skipped); the mean
is unweighted over classes. The paper and the reference's README define the score as the AUC,
while ``calculate_spurious_score`` itself calls scikit-learn's ``average_precision_score``; both
are reported (``mauc``, the paper's, and ``mean_ap``, the script's). Softmax is taken in
float64 (the reference's float32 softmax saturates to ties at 1.0 for confident models).

Where the images come from: an evaluation set whose metadata has ``"spurious_only"`` (its
labels: the class whose spurious feature each image shows), compared with the test set's
logits (``EvalContext.test_outputs``). ``imagefolder`` ships one as the ``spurious`` set when
``<root>/spurious_images/<class>/`` exists. Metrics, under that set's prefix:
``spurious/mauc``, ``spurious/mean_ap``, ``spurious/as_class`` (% of spurious-only images
predicted as their class, the reference table's "Frac Spurious labeled as", averaged over
classes), ``spurious/auc_classes`` (classes scored), ``spurious/class/<k>/auc`` and, when the
cell has a teacher, ``spurious/teacher_mauc``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdbench.engine.evaluation import EvalContext, register_family

#: the metadata key that marks a set of spurious-only images
SPURIOUS_ONLY = "spurious_only"


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of scores ``pos`` (positives) against ``neg``: P(pos > neg) + ½ P(pos = neg).

    The Mann–Whitney statistic with average ranks for ties, equal to scikit-learn's
    ``roc_auc_score``.
    """
    n_pos, n_neg = len(pos), len(neg)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg]).astype(np.float64)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision of ``pos`` against ``neg``: Σ_n (R_n − R_{n−1}) P_n over the distinct
    score thresholds, highest first (scikit-learn's ``average_precision_score``)."""
    if len(pos) == 0:
        raise ValueError("average_precision needs at least one positive score")
    scores = np.concatenate([pos, neg]).astype(np.float64)
    truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order]
    last = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]  # end of each tie run
    tp = np.cumsum(truth)[last]
    precision = tp / (last + 1)
    recall = tp / len(pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def spurious_metrics(in_logits: Tensor, in_y: Tensor, sp_logits: Tensor, sp_y: Tensor) -> dict[str, float]:
    """mAUC and friends from the test set (``in_*``) and the spurious-only images (``sp_*``)."""
    in_p = torch.softmax(in_logits.double(), 1).cpu().numpy()
    sp_p = torch.softmax(sp_logits.double(), 1).cpu().numpy()
    in_y_np, sp_y_np = in_y.cpu().numpy(), sp_y.cpu().numpy()
    sp_pred = sp_p.argmax(1)
    out: dict[str, float] = {}
    aucs, aps, as_class = [], [], []
    for k in np.unique(sp_y_np).tolist():
        pos, neg = in_p[in_y_np == k, k], sp_p[sp_y_np == k, k]
        if len(pos) == 0:
            continue  # the test set has no image of this class: nothing to separate from
        aucs.append(roc_auc(pos, neg))
        aps.append(average_precision(pos, neg))
        as_class.append(100.0 * float(np.mean(sp_pred[sp_y_np == k] == k)))
        out[f"class/{k}/auc"] = aucs[-1]
    if not aucs:
        return {}
    out.update(
        {
            "mauc": float(np.mean(aucs)),
            "mean_ap": float(np.mean(aps)),
            "as_class": float(np.mean(as_class)),
            "auc_classes": float(len(aucs)),
        }
    )
    return out


def spurious_family(
    logits: Tensor, y: Tensor, meta: dict[str, Tensor], teacher_logits: Tensor | None, ctx: EvalContext
) -> dict[str, float]:
    """The evaluation family: spurious mAUC on a set of spurious-only images; {} on other sets."""
    if ctx.cheap or SPURIOUS_ONLY not in (meta or {}) or ctx.test_outputs is None or len(y) == 0:
        return {}
    in_logits, in_y, in_teacher = ctx.test_outputs
    out = spurious_metrics(in_logits, in_y, logits, y)
    if out and teacher_logits is not None and in_teacher is not None:
        out["teacher_mauc"] = spurious_metrics(in_teacher, in_y, teacher_logits, y)["mauc"]
    return out


register_family(spurious_family)
