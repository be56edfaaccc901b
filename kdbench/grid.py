"""Expanding a validated grid into cells, and the ids that make resume exact.

A cell (``kdbench.cells.Cell``) is fully resolved. Its id is a hash of its canonical JSON,
which includes the names and versions of the plugins it uses: change a parameter, a dataset
file or a plugin version and the cell is new; change nothing and it is skipped.
"""

from __future__ import annotations

import itertools
from typing import Any

from kdbench import registry
from kdbench.cells import CELL_FORMAT, Cell, DatasetRef, MethodRef, TeacherSpec, canonical, digest
from kdbench.cells import short as _short
from kdbench.config import Grid, PluginRef, pair_defaults

__all__ = ["CELL_FORMAT", "canonical", "digest", "expand", "method_label", "model_label", "teacher_spec"]


def method_label(ref: PluginRef) -> str:
    """Leaderboard row name: the method name, plus the parameters the grid set explicitly."""
    args = ",".join(f"{k}={_short(ref.params[k])}" for k in ref.given)
    extra = ",".join(f"w.{k}={_short(v)}" for k, v in sorted(ref.loss_weights.items()))
    train = ",".join(_train_parts(ref))
    inner = ",".join(p for p in (args, extra, train) if p)
    return f"{ref.name}({inner})" if inner else ref.name


def _train_parts(ref: PluginRef) -> list[str]:
    """``train.key=value`` for each train field a method row overrides, nested mappings as dotted
    keys (``train.jtt.epochs=1``), augmenters by name with the parameters the row set
    (``train.views.strong=randaugment(num_ops=1)``)."""
    parts = []
    for k, v in sorted(ref.train.items()):
        if k == "augment" and ref.train_augment:
            parts.append(f"train.augment={ref.train_augment['name']}")
        elif k == "views" and ref.train_views is not None:
            parts += [f"train.views.{n}={model_label(a)}" for n, a in sorted(ref.train_views.items())]
            parts += [] if ref.train_views else ["train.views={}"]
        else:
            parts += _dotted(f"train.{k}", v)
    return parts


def _dotted(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [p for k, v in sorted(value.items()) for p in _dotted(f"{key}.{k}", v)]
    return [f"{key}={_short(value)}"]


def model_label(ref: PluginRef) -> str:
    """Column name of a model: the plugin (or source:name) plus the parameters the grid set."""
    hidden = {"taps"}
    base = ref.name
    if ref.name in ("torchvision", "timm"):
        base, hidden = f"{ref.name}:{ref.params.get('name')}", hidden | {"name"}
    elif ref.name == "hf":
        base, hidden = f"hf:{ref.params.get('path')}", hidden | {"path"}
    args = ",".join(f"{k}={_short(ref.params[k])}" for k in ref.given if k not in hidden)
    return f"{base}({args})" if args else base


#: RepDistiller and mdistiller (configs/cifar100/*/..._mv2.yaml, ..._shuv1/2.yaml: LR 0.01)
#: train these students with lr 0.01 instead of 0.05
REPDISTILLER_LOW_LR = {"mobilenetv2", "shufflev1", "shufflev2"}


def student_train(grid: Grid, student: PluginRef) -> dict:
    """The student's training recipe; presets may depend on the student architecture."""
    train = grid.config.train.model_dump(mode="json", exclude={"seed"})
    if (
        grid.config.train.preset in ("repdistiller", "mdistiller")
        and "lr" not in grid.train_given
        and student.name in REPDISTILLER_LOW_LR
    ):
        train["lr"] = 0.01
    return train


def teacher_spec(
    grid: Grid,
    dataset: DatasetRef,
    teacher: PluginRef,
    source: PluginRef,
    source_fingerprint: dict,
    seed: int,
    own_recipe: Any = None,
) -> TeacherSpec:
    """Everything that determines a trained teacher; its hash is the teacher id."""
    tt = own_recipe or grid.config.teacher_train
    tseed = seed if tt.seed == "per_cell" else (0 if tt.seed is None else tt.seed)
    label = model_label(teacher)
    if tt.method is not None:  # a teacher trained with its own loss is another teacher: say which
        args = ",".join(f"{k}={_short(v)}" for k, v in sorted(tt.method["params"].items()))
        label += f"[{tt.method['name']}({args})]" if args else f"[{tt.method['name']}]"
    return TeacherSpec.build(
        format=CELL_FORMAT,
        model=teacher.key(),
        label=label,
        source={**source.key(), "fingerprint": source_fingerprint},
        dataset=dataset,
        train=tt.model_dump(mode="json", exclude={"seed"}),
        augment=grid.teacher_augment.key(),
        seed=tseed,
        plugins=registry.versions(
            [
                ("models", teacher.name),
                ("teachers", source.name),
                ("datasets", dataset.name),
                ("augmenters", grid.teacher_augment.name),
            ]
        ),
        val_fraction=grid.config.eval.val_fraction,
    )


def uses_teacher(m: PluginRef) -> bool:
    """Whether a method (with these parameters) reads a teacher at all (``Distiller.needs_teacher``)."""
    return bool(registry.load("losses", m.name).needs_teacher(**m.method_params))


def method_ref(grid: Grid, m: PluginRef, teacher: PluginRef, student: PluginRef) -> MethodRef:
    """A method as a cell runs it: the grid's values, then the preset's reference values for
    this pair (``config.PAIR_DEFAULTS``) where the grid set none, then the method's defaults."""
    params, weights = dict(m.method_params), dict(m.loss_weights)
    filled: dict[str, str] = {}
    preset = grid.config.train.preset
    for key, value in pair_defaults(preset, m.name, teacher.name, student.name).items():
        if key == "loss_weights":
            for term, w in value.items():
                if term not in weights:
                    weights[term], filled[f"w.{term}"] = w, str(preset)
        elif key not in m.given:
            params[key], filled[key] = value, str(preset)
    return MethodRef(name=m.name, label=method_label(m), params=params, weights=weights, filled_by=filled)


def method_views(grid: Grid, m: PluginRef) -> dict[str, PluginRef]:
    """The extra views a method's cells get: its row's ``train: {views: ...}``, else the grid's."""
    return grid.views if m.train_views is None else m.train_views


def expand(
    grid: Grid,
    dataset_fingerprints: list[dict],
    source_fingerprints: list[dict],
    teacher_dataset_fingerprints: list[dict | None] | None = None,
) -> list[Cell]:
    """All cells of the grid in a stable order (dataset, pair, method, seed).

    ``teacher_dataset_fingerprints`` (aligned with the pairs) fingerprint the pairs' own
    teacher datasets (``teacher_dataset:``); a pair without one trains its teacher on the cell's.
    """
    tds_fp = teacher_dataset_fingerprints or [None] * len(grid.pairs)
    cells = []
    evalc = grid.config.eval.model_dump(mode="json")
    for (d_i, ds), (p_i, (t, s, src)), m, seed in itertools.product(
        enumerate(grid.datasets), enumerate(grid.pairs), grid.methods, grid.config.seeds
    ):
        dataset = DatasetRef(**ds.key(), fingerprint=dataset_fingerprints[d_i])
        tds = grid.teacher_datasets[p_i] if p_i < len(grid.teacher_datasets) else None
        t_data = dataset if tds is None else DatasetRef(**tds.key(), fingerprint=tds_fp[p_i] or {})
        cell = Cell.build(
            format=CELL_FORMAT,
            grid=grid.config.name,
            dataset=dataset,
            student={**s.key(), "label": model_label(s)},
            teacher=teacher_spec(
                grid,
                t_data,
                t,
                src,
                source_fingerprints[p_i],
                seed,
                grid.teacher_trains[p_i] if p_i < len(grid.teacher_trains) else None,
            ),
            uses_teacher=uses_teacher(m),
            method=method_ref(grid, m, t, s),
            seed=seed,
            train={**student_train(grid, s), **m.train},
            augment=m.train_augment or grid.train_augment.key(),
            views={k: v.key() for k, v in sorted(method_views(grid, m).items())},
            eval=evalc,
            plugins=registry.versions(
                [
                    ("datasets", ds.name),
                    ("models", s.name),
                    ("models", t.name),
                    ("losses", m.name),
                    ("augmenters", (m.train_augment or grid.train_augment.key())["name"]),
                ]
                + [("augmenters", v.name) for v in method_views(grid, m).values()]
            ),
        )
        cells.append(cell)
    return cells
