"""The group metric family: per-group, worst-group and mean-group accuracy, and what the
covariate-shift report needs (per-group agreement with the teacher, the split of the
student's error into inherited and own, a spurious-feature scan of the pooled features).

Conventions (WILDS / group_DRO): group ``g = y * n_attr + a``; a group with no sample in the
evaluated set is skipped by the worst and mean group accuracy (its count is still written).
Flat metric names (NOTES.md seam 2), in percent:

- ``group/<name>/acc``, ``group/<name>/n``
- ``worst_group`` (min over non-empty groups), ``mean_group`` (unweighted mean over them)
- ``avg_acc``: sample average; ``adj_avg_acc``: per-group accuracies weighted by the groups'
  share of the *training* split (group_DRO's Waterbirds ``adj_acc_avg``: the test groups of
  Waterbirds are balanced, so this is the accuracy the training distribution would see)
- with a teacher: ``group/<name>/agreement`` (argmax agreement), ``group/<name>/teacher_acc``,
  ``group/<name>/err_inherited`` (student and teacher both wrong) and
  ``group/<name>/err_own`` (student wrong, teacher right): student error = inherited + own
- ``scan/top<k>/dim``, ``scan/top<k>/score``, ``scan/mean``, ``scan/max``: see :func:`feature_scan`
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdbench.datasets.base import GroupInfo
from kdbench.engine.data import Batches
from kdbench.engine.evaluation import EvalContext, TrainedModel, register_family, register_model_hook

#: how many of the most attribute-separating feature dimensions are kept
SCAN_TOP_K = 5


def per_group_correct(correct: Tensor, group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """(number correct, number of samples) per group, as float64 tensors of length ``n_groups``."""
    group = group.long().cpu()
    n = torch.bincount(group, minlength=n_groups).double()
    hits = torch.bincount(group, weights=correct.double().cpu(), minlength=n_groups)
    return hits, n


def group_metrics(
    logits: Tensor,
    y: Tensor,
    group: Tensor,
    info: GroupInfo,
    train_counts: Tensor | None = None,
    teacher_logits: Tensor | None = None,
) -> dict[str, float]:
    """Group metrics of one evaluated set (see the module docstring for the names)."""
    if group.max() >= info.n_groups or group.min() < 0:
        raise ValueError(f"group ids outside 0..{info.n_groups - 1}")
    pred = logits.argmax(1).cpu()
    y = y.cpu()
    correct = pred == y
    hits, n = per_group_correct(correct, group, info.n_groups)
    present = n > 0
    acc = torch.where(present, 100.0 * hits / n.clamp_min(1), torch.zeros_like(n))
    out: dict[str, float] = {}
    for g, name in enumerate(info.names):
        out[f"group/{name}/n"] = float(n[g])
        if present[g]:
            out[f"group/{name}/acc"] = float(acc[g])
    if present.any():
        out["worst_group"] = float(acc[present].min())
        out["mean_group"] = float(acc[present].mean())
    out["avg_acc"] = 100.0 * float(correct.double().mean()) if len(y) else 0.0
    if train_counts is not None:
        w = train_counts.double().cpu() * present
        if w.sum() > 0:
            out["adj_avg_acc"] = float((w * acc).sum() / w.sum())
    if teacher_logits is not None:
        t_pred = teacher_logits.argmax(1).cpu()
        t_correct = t_pred == y
        per = {
            "agreement": pred == t_pred,
            "teacher_acc": t_correct,
            "err_inherited": ~correct & ~t_correct,
            "err_own": ~correct & t_correct,
        }
        for key, mask in per.items():
            k_hits, _ = per_group_correct(mask, group, info.n_groups)
            for g, name in enumerate(info.names):
                if present[g]:
                    out[f"group/{name}/{key}"] = float(100.0 * k_hits[g] / n[g])
    return out


def feature_scan(features: Tensor, y: Tensor, attr: Tensor, n_attr: int, eps: float = 1e-6) -> Tensor:
    """How strongly each feature dimension separates the attribute values within a class.

    Per dimension: the standardised mean difference (Cohen's d,
    ``|μ_a − μ_b| / sqrt((σ²_a + σ²_b) / 2)``) between two attribute values of one class,
    averaged over every class and pair of values with at least two samples each. A
    dimension that scores high encodes the attribute beyond what the class explains, i.e.
    the spurious feature. Returns a ``[D]`` tensor (zeros when no pair qualifies).
    """
    f = features.double().flatten(1).cpu()
    y, attr = y.long().cpu(), attr.long().cpu()
    total = torch.zeros(f.shape[1], dtype=torch.float64)
    pairs = 0
    for c in torch.unique(y).tolist():
        stats = []
        for a in range(n_attr):
            m = (y == c) & (attr == a)
            if int(m.sum()) >= 2:
                fa = f[m]
                stats.append((fa.mean(0), fa.var(0)))
        for i in range(len(stats)):
            for j in range(i + 1, len(stats)):
                (mi, vi), (mj, vj) = stats[i], stats[j]
                total += (mi - mj).abs() / ((vi + vj) / 2 + eps).sqrt()
                pairs += 1
    return (total / pairs).float() if pairs else total.float()


def scan_metrics(scores: Tensor, top_k: int = SCAN_TOP_K) -> dict[str, float]:
    """The top-k dimensions of a :func:`feature_scan` (1-based rank), its mean and max."""
    if scores.numel() == 0:
        return {}
    k = min(top_k, scores.numel())
    top = scores.topk(k)
    out = {"scan/mean": float(scores.mean()), "scan/max": float(top.values[0])}
    for r, (d, s) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), start=1):
        out[f"scan/top{r}/dim"] = float(d)
        out[f"scan/top{r}/score"] = float(s)
    return out


def group_family(
    logits: Tensor, y: Tensor, meta: dict[str, Tensor], teacher_logits: Tensor | None, ctx: EvalContext
) -> dict[str, float]:
    """The evaluation family (``evaluation.FAMILIES``): {} for data without groups.

    Per-epoch evaluation (``ctx.cheap``) gets only ``worst_group`` and ``mean_group``.
    """
    info, group = ctx.group_info, (meta or {}).get("group")
    if info is None or group is None or len(group) != len(y) or len(y) == 0:
        return {}
    train_group = ctx.train_meta.get("group") if ctx.train_meta else None
    train_counts = (
        None if train_group is None else torch.bincount(train_group.long().cpu(), minlength=info.n_groups)
    )
    out = group_metrics(logits, y, group, info, train_counts, None if ctx.cheap else teacher_logits)
    if ctx.cheap:
        return {k: out[k] for k in ("worst_group", "mean_group") if k in out}
    return out


register_family(group_family)


@torch.no_grad()
def _outputs(m: TrainedModel, batches: Batches, pooled: bool) -> tuple[Tensor, Tensor | None]:
    """Logits (and the pooled penultimate features, the classifier's input, when ``pooled``)
    of ``m`` on a whole split, from one forward pass per batch."""
    captured: list[Tensor] = []
    handle = None
    if pooled:
        fc = m.model.get_submodule(m.taps.classifier)
        handle = fc.register_forward_pre_hook(
            lambda _m, inp: captured.append(inp[0].flatten(1).float().cpu())
        )
    logits, feats = [], []
    try:
        for x, _, _ in batches.iterate(None, drop_singletons=False):
            captured.clear()
            logits.append(m.logits(x.to(m.device, non_blocking=True)).float().cpu())
            if captured:
                feats.append(captured[-1])
    finally:
        if handle is not None:
            handle.remove()
    complete = feats and len(feats) == len(logits)  # a head that bypasses the classifier: no features
    return torch.cat(logits), (torch.cat(feats) if complete else None)


def group_hook(m: TrainedModel) -> dict[str, float]:
    """After the final evaluation of a model on data with groups: per-group accuracy on the
    training split (``train/...``), the spurious-feature scan of its pooled features on the
    test set (``scan/...``) and, for a student with ``eval.dfr``, DFR's metrics (``dfr/...``).
    """
    info = m.ctx.group_info
    if info is None or "group" not in m.train.meta:
        return {}
    n_train = len(m.train.meta["group"])
    want_dfr = m.role == "student" and bool(m.options.get("dfr")) and bool(m.taps.classifier)
    # DFR (the paper's procedure) standardises with the training split's statistics
    train_logits, train_feats = _outputs(m, m.train, pooled=want_dfr)
    train_y = m.train.targets()[:n_train]
    train_g = m.train.meta["group"][:n_train]
    ctx = EvalContext(set_name="train", group_info=info, train_meta=m.ctx.train_meta)
    out = {
        f"train/{k}": v
        for k, v in group_family(train_logits[:n_train], train_y, m.train.meta, None, ctx).items()
    }
    if not m.taps.classifier:
        return out  # no pooled features: no scan, no DFR
    test = m.sets.get("test")
    feats: dict[str, tuple[Tensor, Tensor | None]] = {}
    if test is not None and "attr" in test.meta:
        feats["test"] = _outputs(m, test.batches, pooled=True)
        f = feats["test"][1]
        if f is not None:
            out.update(scan_metrics(feature_scan(f, test.targets(), test.meta["attr"], info.n_attr)))
    if want_dfr:
        out.update(_dfr(m, info, train_feats, train_y, train_g, feats))
    return out


def _dfr(
    m: TrainedModel,
    info: GroupInfo,
    train_feats: Tensor | None,
    train_y: Tensor,
    train_g: Tensor,
    cached: dict[str, tuple[Tensor, Tensor | None]],
) -> dict[str, float]:
    """DFR on the validation split when there is one, else on the training split (DFR^Tr_Tr)."""
    from kdbench.robustness.dfr import fit_dfr

    if m.val is not None and "group" in m.val.meta:
        _, held_f = _outputs(m, m.val, pooled=True)
        held_y, held_g = m.val.targets(), m.val.meta["group"]
        source = 1.0
    else:
        held_f, held_y, held_g, source = train_feats, train_y, train_g, 0.0
    if held_f is None:
        return {}
    n_classes = int(info.n_groups // max(info.n_attr, 1))
    procedure = m.options.get("dfr_procedure") or "paper"
    train_f = None if train_feats is None else train_feats[: len(train_y)]
    head = fit_dfr(
        held_f[: len(held_y)],
        held_y,
        held_g,
        n_classes,
        seed=m.seed,
        procedure=procedure,
        train_features=train_f,
    )
    out = {"dfr/on_val": source}
    for name, s in m.sets.items():
        if "group" not in s.meta or (source and name == "val") or name.startswith("c/"):
            continue  # no groups, the very samples the head was fitted on, or a corruption set
        _, f = cached[name] if name in cached else _outputs(m, s.batches, pooled=True)
        if f is None:
            continue
        ctx = EvalContext(set_name=name, group_info=info, train_meta=m.ctx.train_meta)
        dfr_logits = head(f)
        y = s.targets()
        res = group_family(dfr_logits, y, s.meta, None, ctx)
        res["top1"] = 100.0 * float((dfr_logits.argmax(1) == y).double().mean())
        prefix = "dfr" if name == "test" else f"dfr/{name}"
        out.update({f"{prefix}/{k}": v for k, v in res.items()})
    return out


register_model_hook(group_hook)
