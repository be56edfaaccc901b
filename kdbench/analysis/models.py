"""Building a grid pair's models and a probe batch outside a sweep (for the analysis commands)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.features import FeatureReader, Features, TapSpec


def as_dict(x: Any) -> Any:
    """A typed record (pydantic) as its plain JSON dict; dicts pass through."""
    return x.model_dump(mode="json") if hasattr(x, "model_dump") else x


@dataclass
class PairModels:
    """A teacher (trained, when the run directory has it) and a student, with their taps."""

    label: str
    teacher: nn.Module
    teacher_taps: TapSpec
    teacher_trained: bool
    student: nn.Module
    student_taps: TapSpec
    probe: Tensor
    probe_y: Tensor
    num_classes: int


def probe_batch(dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` training images picked by a seeded permutation (the same for every model)."""
    from kdbench.engine.data import Batches

    split = dataset.split("train")
    g = torch.Generator().manual_seed(seed)
    xs, ys, got = [], [], 0
    for x, y, _ in Batches(split, max(n, 2)).iterate(g, drop_singletons=False):
        xs.append(x)
        ys.append(y)
        got += len(x)
        if got >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def load_teacher_weights(model: nn.Module, run_dir: Path | None, teacher_id: str) -> bool:
    """Load ``teachers/<id>.pt`` (verified against its checksum) when the run directory has it."""
    if run_dir is None:
        return False
    path = Path(run_dir) / "teachers" / f"{teacher_id}.pt"
    if not path.exists():
        return False
    from kdbench.artifacts import load_checked, sidecar

    if sidecar(path).exists():
        state = load_checked(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return True


def pair_models(cell: Any, run_dir: Path | None, probe_size: int = 256, seed: int = 0) -> PairModels:
    """Models of one cell's pair: the cached teacher if trained, the student at initialisation."""
    from kdbench.engine.build import build_dataset, build_model

    c = as_dict(cell)
    ds = build_dataset(c["dataset"])
    teacher, t_taps = build_model(c["teacher"]["model"], ds.num_classes, ds.in_channels)
    trained = load_teacher_weights(teacher, run_dir, c["teacher"]["id"])
    torch.manual_seed(c.get("seed", 0))
    student, s_taps = build_model(c["student"], ds.num_classes, ds.in_channels)
    x, y = probe_batch(ds, probe_size, seed)
    label = f"{c['teacher']['label']}→{c['student']['label']}"
    return PairModels(label, teacher.eval(), t_taps, trained, student.eval(), s_taps, x, y, ds.num_classes)


@torch.no_grad()
def read(model: nn.Module, taps: TapSpec, x: Tensor, wanted=("logits", "stages", "pooled")) -> Features:
    """Features of ``x`` in eval mode (stages flattened per sample by the caller)."""
    if not taps.stages and "stages" in wanted:
        raise KdbenchError("this model exposes no stages; give it `taps:` in the grid")
    reader = FeatureReader(model, taps, list(wanted))
    was = model.training
    model.eval()
    try:
        return reader.read(x).detach()
    finally:
        model.train(was)
        reader.close()
