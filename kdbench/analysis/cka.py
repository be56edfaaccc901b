"""The CKA toolkit: layer-by-layer linear CKA between a teacher and a student (``kdbench cka``).

For one pair of a grid (or of a finished run), on a fixed probe batch of training images:

* the L_s × L_t matrix CKA(student stage i, teacher stage j) and the teacher's own
  L_t × L_t matrix, with the fused ``cka_matrix`` kernel;
* the contiguous teacher grouping the ``ckakd`` method would choose from that matrix
  (:func:`kdbench.methods.ckakd.cka_groups`), drawn on the heatmap;
* for a finished ``ckakd`` cell, the student–teacher matrix before distillation (the student
  at initialisation) and after (the cell's ``student.pt``), side by side.

Numbers go to CSV (one row per matrix entry), pictures to PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdbench.analysis.models import PairModels, as_dict, read
from kdbench.errors import KdbenchError
from kdbench.kernels import cka_matrix
from kdbench.methods.ckakd import cka_groups, even_groups


@dataclass
class CKAMaps:
    """CKA matrices of one pair; ``after`` only for a distilled ckakd cell."""

    label: str
    student_teacher: Tensor  # [L_s, L_t]
    teacher_teacher: Tensor  # [L_t, L_t]
    teacher_groups: list[list[int]]
    student_groups: list[list[int]]
    after: Tensor | None = None
    notes: list[str] = field(default_factory=list)


def stage_cka(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Linear (biased-HSIC) CKA between every pair of stages, computed in float64."""
    return cka_matrix([x.flatten(1).double() for x in xs], [y.flatten(1).double() for y in ys]).float()


def compute(pm: PairModels, n_groups: int = 3, after_state: dict | None = None) -> CKAMaps:
    t = read(pm.teacher, pm.teacher_taps, pm.probe, ("stages",)).stages
    s = read(pm.student, pm.student_taps, pm.probe, ("stages",)).stages
    st = stage_cka(s, t)
    tt = stage_cka(t, t)
    k = max(1, min(n_groups, len(s), len(t)))
    maps = CKAMaps(pm.label, st, tt, cka_groups(tt, k), even_groups(len(s), k))
    if not pm.teacher_trained:
        maps.notes.append("teacher at initialisation (no trained teacher in the run directory)")
    if after_state is not None:
        pm.student.load_state_dict(after_state)
        s_after = read(pm.student, pm.student_taps, pm.probe, ("stages",)).stages
        maps.after = stage_cka(s_after, t)
    return maps


def write_csv(maps: CKAMaps, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["matrix", "row_layer", "col_layer", "cka"])
        named = [("student_teacher", maps.student_teacher), ("teacher_teacher", maps.teacher_teacher)]
        if maps.after is not None:
            named.append(("student_teacher_after", maps.after))
        for name, m in named:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    w.writerow([name, i, j, f"{float(m[i, j]):.6f}"])
    tmp.replace(path)


def _draw_groups(ax: Any, rows: list[list[int]] | None, cols: list[list[int]]) -> None:
    from matplotlib.patches import Rectangle

    pairs = zip(rows, cols, strict=False) if rows is not None else ((g, g) for g in cols)
    for r, c in pairs:
        ax.add_patch(
            Rectangle((c[0] - 0.5, r[0] - 0.5), len(c), len(r), fill=False, edgecolor="white", linewidth=2.0)
        )


def heatmap(maps: CKAMaps, path: Path) -> None:
    """Heatmaps (student × teacher, teacher × teacher, and after distillation) with groups boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("student × teacher" + (" (before)" if maps.after is not None else ""), maps.student_teacher)]
    if maps.after is not None:
        panels.append(("student × teacher (after ckakd)", maps.after))
    panels.append(("teacher × teacher", maps.teacher_teacher))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels, strict=False):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", origin="upper")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("teacher stage")
        ax.set_ylabel("teacher stage" if title.startswith("teacher") else "student stage")
        if title.startswith("teacher"):
            _draw_groups(ax, None, maps.teacher_groups)
        else:
            _draw_groups(ax, maps.student_groups, maps.teacher_groups)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        f"linear CKA: {maps.label}" + (f" — {'; '.join(maps.notes)}" if maps.notes else ""), fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ckakd_groups(cells: list[Any], default: int = 3) -> int:
    """The n_groups of a ckakd method in these cells (the grid's), else ``default``."""
    for c in cells:
        m = as_dict(c)["method"]
        if m["name"] == "ckakd":
            return int(m["params"].get("n_groups", default))
    return default


def distilled_state(run_dir: Path | None, cells: list[Any], pair_key: tuple) -> dict | None:
    """``student.pt`` of a finished ckakd cell of this pair (first seed), if the run has one."""
    if run_dir is None:
        return None
    for c in cells:
        d = as_dict(c)
        if d["method"]["name"] != "ckakd" or _pair_key(d) != pair_key:
            continue
        f = Path(run_dir) / "cells" / d["id"] / "student.pt"
        if f.exists() and (f.parent / "result.json").exists():
            return torch.load(f, map_location="cpu", weights_only=True)
    return None


def _pair_key(c: dict) -> tuple:
    return (c["dataset"]["name"], c["teacher"]["id"], str(c["student"]))


def pairs_of(cells: list[Any]) -> list[dict]:
    """One representative cell per (dataset, teacher, student), in grid order."""
    seen, out = set(), []
    for c in cells:
        d = as_dict(c)
        if _pair_key(d) not in seen:
            seen.add(_pair_key(d))
            out.append(d)
    if not out:
        raise KdbenchError("the grid has no cells")
    return out
