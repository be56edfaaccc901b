"""Training-free student ranking (``kdbench rank-students``): which student will distil best?

Every student of a grid is scored against its (trained) teacher at initialisation, on one
probe batch, with no training. DisWOT (Dong et al., CVPR 2023) as its reference code computes
it (github.com/lilujunai/DisWOT-CVPR2023, ``exps/parse_nb201_distill.py``
``compute_diswot_procedure`` with ``distiller_zoo/ICKD.py`` and ``distiller_zoo/SP.py``); each
model runs one forward pass in training mode (batch-statistics BatchNorm, as the reference never
calls ``eval()``) and one cross-entropy backward:

* ``diswot_sem`` — semantic similarity: the gradients of the classifier weights G [K, C]
  (``fc.weight.grad``), per class k the C × C channel matrix ``g_k g_kᵀ`` with rows
  L2-normalised, score = −Σ_k ‖M_t,k − M_s,k‖²_F / (C_t · K) (``ICKDLoss`` with the teacher as
  its first argument: the student's gradient is viewed as [K, C_t, C_s / C_t]; where C_s is not
  a multiple of C_t, where the reference fails, it is zero-padded to the next multiple).
* ``diswot_rel`` — relation similarity: the B × B Grams of the pooled features (the classifier
  input, the reference's ``feature[-1]``), rows L2-normalised, score = −Σ (A_t − A_s)² / B².
* ``diswot`` — their sum (the reference's combined score).
* ``cka`` — for each teacher stage the best linear CKA against any student stage, averaged.
* ``diswot_sem_cam``, ``diswot_rel_fro`` — kdbench's former readings, kept as variants:
  per-sample Grad-CAM maps of the last stage (eval mode) compared as B × B similarity matrices,
  −‖G_t − G_s‖_F; the last stage's row-normalised Gram, −‖A_t − A_s‖_F.

Not as in the reference: it re-initialises both networks with N(0, 1) weights before scoring
(its teacher too); kdbench scores the grid's student at its own initialisation against the
trained teacher when the run directory has one.

Higher is better for every score. When the run directory holds distilled results for these
students, :func:`correlations` gives Kendall's τ and Spearman's ρ (scipy.stats) between each
score and the measured top-1, so the user sees which score predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.analysis.cka import stage_cka
from kdbench.analysis.models import PairModels, read
from kdbench.errors import KdbenchError
from kdbench.features import FeatureReader, TapSpec

SCORES = ("diswot_sem", "diswot_rel", "diswot", "cka", "diswot_sem_cam", "diswot_rel_fro")


@dataclass
class StudentScore:
    label: str  # teacher→student column label
    student: str
    scores: dict[str, float]
    teacher_trained: bool


def classifier_grad(model: nn.Module, taps: TapSpec, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One training-mode forward and a mean cross-entropy backward, as the reference scores:
    (the classifier's input [B, C], the gradient of the classifier weight [K, C]).

    The model is left as it was: mode, and BatchNorm running statistics restored.
    """
    if not taps.classifier:
        raise KdbenchError(
            f"{type(model).__name__} names no classifier; give it `taps: {{classifier: path}}` in the grid"
        )
    weight = model.get_submodule(taps.classifier).weight
    saved = {k: b.clone() for k, b in model.named_buffers()}
    reader = FeatureReader(model, taps, ["logits", "pooled"])
    was = model.training
    model.train()
    try:
        with torch.enable_grad():
            f = reader.read(x)
            (g,) = torch.autograd.grad(F.cross_entropy(f.logits, y), weight)
        return f.pooled.detach(), g.detach()
    finally:
        model.train(was)
        reader.close()
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])


def semantic_score(g_t: Tensor, g_s: Tensor) -> float:
    """DisWOT's semantic score from the classifier-weight gradients [K, C_t] and [K, C_s]."""
    k, ch = g_t.shape
    if g_s.shape[0] != k:
        raise KdbenchError(f"teacher and student predict {k} and {g_s.shape[0]} classes; they must agree")
    r = -(-g_s.shape[1] // ch)
    ft = g_t.double().reshape(k, ch, 1)
    fs = F.pad(g_s.double(), (0, r * ch - g_s.shape[1])).reshape(k, ch, r)

    def channel_similarity(f: Tensor) -> Tensor:
        return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)

    d = channel_similarity(ft) - channel_similarity(fs)
    return -float((d * d).sum() / (ch * k))


def relation_score(f_t: Tensor, f_s: Tensor) -> float:
    """DisWOT's relation score: row-normalised B × B Grams, −Σ (A_t − A_s)² / B²."""
    b = f_t.shape[0]

    def gram(f: Tensor) -> Tensor:
        f = f.flatten(1).double()
        return F.normalize(f @ f.T, dim=1)

    d = gram(f_t) - gram(f_s)
    return -float((d * d).sum() / (b * b))


def relation_score_frobenius(t_last: Tensor, s_last: Tensor) -> float:
    """kdbench's former relation score: the last stages' row-normalised Grams, −‖A_t − A_s‖_F."""

    def gram(f: Tensor) -> Tensor:
        f = f.flatten(1)
        return F.normalize(f @ f.T, dim=1)

    return -float(torch.linalg.matrix_norm(gram(t_last) - gram(s_last)))


def grad_cam(model: nn.Module, taps: TapSpec, x: Tensor, y: Tensor) -> Tensor:
    """Grad-CAM of the last stage for each sample's label: [B, H, W], non-negative."""
    reader = FeatureReader(model, taps, ["logits", "stages"])
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            f = reader.read(x)
            a = f.stages[-1]
            if a.dim() != 4:
                raise KdbenchError("Grad-CAM needs a [B, C, H, W] last stage")
            picked = f.logits.gather(1, y[:, None]).sum()
            (g,) = torch.autograd.grad(picked, a)
        weights = g.mean(dim=(2, 3), keepdim=True)
        return F.relu((weights * a).sum(1)).detach()
    finally:
        model.train(was)
        reader.close()


def _sample_similarity(m: Tensor) -> Tensor:
    v = F.normalize(m.flatten(1), dim=1)
    return v @ v.T


def semantic_score_gradcam(pm: PairModels) -> float:
    """kdbench's former semantic score: per-sample Grad-CAM maps, −‖G_t − G_s‖_F."""
    ct = grad_cam(pm.teacher, pm.teacher_taps, pm.probe, pm.probe_y)
    cs = grad_cam(pm.student, pm.student_taps, pm.probe, pm.probe_y)
    if cs.shape[-2:] != ct.shape[-2:]:
        cs = F.interpolate(cs[:, None], size=ct.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return -float(torch.linalg.matrix_norm(_sample_similarity(ct) - _sample_similarity(cs)))


def cka_score(t_stages: list[Tensor], s_stages: list[Tensor]) -> float:
    """Mean over teacher stages of the best linear CKA against any student stage."""
    m = stage_cka(s_stages, t_stages)  # [L_s, L_t]
    return float(m.max(dim=0).values.mean())


def score_pair(pm: PairModels) -> dict[str, float]:
    """Every score of :data:`SCORES` for one teacher→student pair."""
    pooled_t, g_t = classifier_grad(pm.teacher, pm.teacher_taps, pm.probe, pm.probe_y)
    pooled_s, g_s = classifier_grad(pm.student, pm.student_taps, pm.probe, pm.probe_y)
    sem, rel = semantic_score(g_t, g_s), relation_score(pooled_t, pooled_s)
    t = read(pm.teacher, pm.teacher_taps, pm.probe, ("stages",)).stages
    s = read(pm.student, pm.student_taps, pm.probe, ("stages",)).stages
    return {
        "diswot_sem": sem,
        "diswot_rel": rel,
        "diswot": sem + rel,
        "cka": cka_score(t, s),
        "diswot_sem_cam": semantic_score_gradcam(pm),
        "diswot_rel_fro": relation_score_frobenius(t[-1], s[-1]),
    }


def correlations(scores: list[StudentScore], measured: dict[str, float]) -> dict[str, dict[str, float]]:
    """Kendall τ and Spearman ρ (with p-values) of each score against measured top-1 per column."""
    from scipy import stats

    have = [s for s in scores if s.label in measured]
    out: dict[str, dict[str, float]] = {}
    if len(have) < 3:
        return out
    acc = [measured[s.label] for s in have]
    for name in (n for n in SCORES if all(n in s.scores for s in have)):
        vals = [s.scores[name] for s in have]
        tau = stats.kendalltau(vals, acc)
        rho = stats.spearmanr(vals, acc)
        out[name] = {
            "kendall_tau": float(tau.statistic),
            "kendall_p": float(tau.pvalue),
            "spearman_rho": float(rho.statistic),
            "spearman_p": float(rho.pvalue),
            "n": len(have),
        }
    return out


def measured_top1(store_cells: list[dict[str, Any]], method: str) -> dict[str, float]:
    """Mean top-1 over seeds of ``method`` per teacher→student column label, from store rows."""
    from collections import defaultdict

    acc: dict[str, list[float]] = defaultdict(list)
    for row in store_cells:
        cfg = row["config"]
        if row["status"] != "done" or cfg["method"]["name"] != method:
            continue
        acc[f"{cfg['teacher']['label']}→{cfg['student']['label']}"].append(float(row["metrics"]["top1"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}
