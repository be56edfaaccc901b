"""Training-free student ranking (``kdbench rank-students``): which student will distil best?

Every student of a grid is scored against its (trained) teacher at initialisation, on one
probe batch, with no training:

* ``diswot_sem`` — DisWOT's semantic similarity (Dong et al., CVPR 2023): class activation
  maps (Grad-CAM on the last stage, for each sample's label) of teacher and student, each
  sample's map flattened and L2-normalised, compared as B × B sample-similarity matrices:
  score = −‖G_t − G_s‖_F (our reading of the paper: maps resized to the teacher's resolution).
* ``diswot_rel`` — DisWOT's relation similarity: the SP-style B × B Gram of the flattened last
  stage, rows L2-normalised, score = −‖A_t − A_s‖_F.
* ``diswot`` — their sum (the paper's combined metric).
* ``cka`` — for each teacher stage the best linear CKA against any student stage, averaged.

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
from kdbench.features import FeatureReader, TapSpec

SCORES = ("diswot_sem", "diswot_rel", "diswot", "cka")


@dataclass
class StudentScore:
    label: str  # teacher→student column label
    student: str
    scores: dict[str, float]
    teacher_trained: bool


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
                raise ValueError("Grad-CAM needs a [B, C, H, W] last stage")
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


def semantic_score(pm: PairModels) -> float:
    ct = grad_cam(pm.teacher, pm.teacher_taps, pm.probe, pm.probe_y)
    cs = grad_cam(pm.student, pm.student_taps, pm.probe, pm.probe_y)
    if cs.shape[-2:] != ct.shape[-2:]:
        cs = F.interpolate(cs[:, None], size=ct.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return -float(torch.linalg.matrix_norm(_sample_similarity(ct) - _sample_similarity(cs)))


def relation_score(t_last: Tensor, s_last: Tensor) -> float:
    def gram(f: Tensor) -> Tensor:
        f = f.flatten(1)
        return F.normalize(f @ f.T, dim=1)

    return -float(torch.linalg.matrix_norm(gram(t_last) - gram(s_last)))


def cka_score(t_stages: list[Tensor], s_stages: list[Tensor]) -> float:
    m = stage_cka(s_stages, t_stages)  # [L_s, L_t]
    return float(m.max(dim=0).values.mean())


def score_pair(pm: PairModels) -> dict[str, float]:
    t = read(pm.teacher, pm.teacher_taps, pm.probe, ("stages",)).stages
    s = read(pm.student, pm.student_taps, pm.probe, ("stages",)).stages
    sem = semantic_score(pm)
    rel = relation_score(t[-1], s[-1])
    return {"diswot_sem": sem, "diswot_rel": rel, "diswot": sem + rel, "cka": cka_score(t, s)}


def correlations(scores: list[StudentScore], measured: dict[str, float]) -> dict[str, dict[str, float]]:
    """Kendall τ and Spearman ρ (with p-values) of each score against measured top-1 per column."""
    from scipy import stats

    have = [s for s in scores if s.label in measured]
    out: dict[str, dict[str, float]] = {}
    if len(have) < 3:
        return out
    acc = [measured[s.label] for s in have]
    for name in SCORES:
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
