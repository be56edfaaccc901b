"""Checks that need the models built, run before anything trains (``kdbench run``, ``--dry-run``).

A method can only tell whether it fits a pair from the pair's feature shapes (FSP needs equal
channels stage by stage; FitNet-style regressors need stage taps). Those shapes do not depend
on training, so each (dataset, pair) is built UNTRAINED, one random probe batch of the
dataset's image shape goes through both models, and every method of the grid is constructed
from that context. A method that raises a KdbenchError there would fail in every cell of the
pair, after its teacher trained. Such (dataset, pair, method) combinations are returned as
misfits: the runner fails their cells at once (no teacher is trained for them) and runs the
rest of the sweep; ``--dry-run`` lists them and exits 1. A pair whose models cannot be built
at all is a config problem (exit 2).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from kdbench import registry
from kdbench.config import Grid, PluginRef
from kdbench.errors import KdbenchError
from kdbench.features import probe_features

#: images of the random probe batch (>1 so batch statistics are defined)
PROBE_SIZE = 4


def _shape(ds: Any) -> tuple[int, int, int] | None:
    """(num_classes, in_channels, image_size) of a dataset instance, or None if it does not say."""
    try:
        return int(ds.num_classes), int(ds.in_channels), int(ds.image_size)
    except (AttributeError, TypeError, ValueError):
        return None


Misfits = dict[tuple[int, int, int], tuple[tuple[Any, ...], str]]


def view_problems(grid: Grid) -> list[tuple[tuple[Any, ...], str]]:
    """Methods that declare a view the grid does not provide, as ``[(grid key path, message)]``.

    A method's ``student_view`` (consistency: ``"strong"``) and its extra ``views`` (MLKD's
    ``("strong",)``) must name a view of ``train.views`` (its row's own ``train: {views: ...}``
    where it sets one; a ``student_view`` may also name an augmenter). Without it the method
    would train on something else than it declares.
    """
    from kdbench.grid import method_views

    problems: list[tuple[tuple[Any, ...], str]] = []
    augmenters = set(registry.names("augmenters"))
    for m_i, m in enumerate(grid.methods):
        cls = registry.load("losses", m.name)
        wanted = [("student view", getattr(cls, "student_view", None))]
        wanted += [("view", v) for v in getattr(cls, "views", ())]
        views = method_views(grid, m)
        where = "this row's train.views" if m.train_views is not None else "train.views"
        for what, name in wanted:
            if name is None or name in views or (what == "student view" and name in augmenters):
                continue
            have = ", ".join(sorted(views)) or "none"
            problems.append(
                (
                    ("methods", m_i),
                    f"{m.name} trains on the {what} {name!r}, which {where} does not define (it has: "
                    f"{have}); add it, e.g. `train: {{views: {{{name}: randaugment}}}}`, or drop {m.name}",
                )
            )
    return problems


def method_fit_problems(grid: Grid, datasets: list[Any] | None = None) -> list[tuple[tuple[Any, ...], str]]:
    """Every pair problem and method misfit as ``[(grid key path, message)]`` (see ``method_fit``)."""
    problems, misfits = method_fit(grid, datasets)
    return problems + list(misfits.values())


def method_fit(
    grid: Grid, datasets: list[Any] | None = None, descriptions: dict[tuple[int, int, int], str] | None = None
) -> tuple[list[tuple[tuple[Any, ...], str]], Misfits]:
    """Grid problems ``[(grid key path, message)]`` (a method's view the grid lacks, models that
    cannot be built or run a probe batch) and misfits ``{(dataset index, pair index, method
    index): (grid key path, message)}`` (a method that cannot be built for that dataset and pair).

    ``datasets`` are the instantiated dataset plugins in grid order (the runner's plan has them);
    None builds them here. A dataset that does not state its image shape is skipped. When given,
    ``descriptions`` receives what each method built for each (dataset, pair) (``describe()``).
    """
    from kdbench.engine.build import build_model
    from kdbench.grid import model_label, uses_teacher

    problems = view_problems(grid)
    misfits: Misfits = {}
    for d_i, ref in enumerate(grid.datasets):
        ds = datasets[d_i] if datasets is not None else _instantiate(ref)
        shape = _shape(ds) if ds is not None else None
        if shape is None:
            continue
        num_classes, in_channels, size = shape
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(PROBE_SIZE, in_channels, size, size, generator=gen)
        for p_i, (t_ref, s_ref, _) in enumerate(grid.pairs):
            where = f"{model_label(s_ref)} student, {model_label(t_ref)} teacher on {ref.name}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.manual_seed(0)
                    student, sspec = build_model(s_ref.key(), num_classes, in_channels)
                    s_probe = probe_features(student, sspec, x)
                    teacher = tspec = t_probe = None
                    if any(uses_teacher(m) for m in grid.methods):
                        teacher, tspec = build_model(t_ref.key(), num_classes, in_channels)
                        t_probe = probe_features(teacher, tspec, x)
            except KdbenchError as e:
                problems.append((("pairs", p_i), f"cannot build the pair ({where}): {e}"))
                continue
            except Exception as e:  # a model that fails on the probe fails in every cell
                problems.append((("pairs", p_i), f"the pair fails on a probe batch ({where}): {e!r}"))
                continue
            for m_i, m in enumerate(grid.methods):
                msg, described = _build_method(
                    m, student, teacher, tspec, s_probe, t_probe, num_classes, grid, sspec
                )
                if described and descriptions is not None:
                    descriptions[d_i, p_i, m_i] = described
                if not msg:
                    aug = m.train_augment or grid.train_augment.key()
                    shape3 = (num_classes, in_channels, size)
                    msg = _augmenter_misfit(aug, uses_teacher(m), shape3, s_probe, t_probe)
                if msg:
                    misfits[d_i, p_i, m_i] = (("methods", m_i), f"{m.name} does not fit {where}: {msg}")
    return problems, misfits


def _augmenter_misfit(aug: dict[str, Any], has_teacher: bool, shape: tuple, s_probe, t_probe) -> str | None:
    """A dataset-level augmenter's own check (``validate``; ConfiG: image size, class counts)."""
    cls = registry.load("augmenters", aug["name"])
    if not getattr(cls, "dataset_level", False) or not callable(getattr(cls, "validate", None)):
        return None
    if getattr(cls, "needs_teacher", False) and not has_teacher:
        return f"augmenter {aug['name']!r} needs a teacher; use it with a distillation method"
    try:
        cls(**aug.get("params", {})).validate(
            *shape,
            teacher_classes=int(t_probe.logits.shape[1]) if has_teacher and t_probe is not None else None,
            student_classes=int(s_probe.logits.shape[1]),
        )
    except KdbenchError as e:
        return str(e)
    return None


def _classifier(model, spec) -> Any:
    return model.get_submodule(spec.classifier) if spec is not None and spec.classifier else None


def _instantiate(ref: PluginRef) -> Any:
    try:
        return registry.load("datasets", ref.name)(**ref.params)
    except KdbenchError:
        return None  # the runner's plan reports dataset problems itself


def _build_method(
    m, student, teacher, tspec, s_probe, t_probe, num_classes, grid: Grid, sspec=None
) -> tuple[str | None, str]:
    """(why the method cannot be built for this pair, or None; what it built: ``describe()``)."""
    from kdbench.grid import uses_teacher
    from kdbench.methods.base import MethodContext

    needs = uses_teacher(m)
    if needs and teacher is None:
        return None, ""
    classifier = None
    if needs and tspec is not None and tspec.classifier:
        classifier = teacher.get_submodule(tspec.classifier)
    n_train = 2 * num_classes
    ctx = MethodContext(
        num_classes=num_classes,
        num_train=n_train,
        epochs=grid.config.train.epochs,
        batch_size=grid.config.train.batch_size,
        student_shapes=s_probe.shapes(),
        teacher_shapes=t_probe.shapes() if needs and t_probe is not None else {},
        student_probe=s_probe,
        teacher_probe=t_probe if needs else None,
        teacher_classifier=classifier,
        student_classifier=_classifier(student, sspec),
        train_targets=torch.arange(n_train) % num_classes,
    )
    cls = registry.load("losses", m.name)
    # the method's own layers are made on the meta device (no memory, no init: SemCKD's
    # projections for wide pairs take seconds to initialise); a method that computes from the
    # probe features during construction and cannot do so there is rebuilt on the CPU
    for device in ("meta", "cpu"):
        try:
            with warnings.catch_warnings(), torch.device(device):
                warnings.simplefilter("ignore")
                built = cls(ctx, **m.method_params)
            try:
                described = str(built.describe()) if callable(getattr(built, "describe", None)) else ""
            except Exception:  # a description that needs real tensors: none in the dry run
                described = ""
            return None, described
        except KdbenchError as e:
            return str(e), ""
        except Exception:
            continue  # not a config problem we can name here; the cell itself will tell
    return None, ""


def teacher_datasets(
    grid: Grid, datasets: list[Any]
) -> tuple[list[dict | None], list[tuple[tuple[Any, ...], str]]]:
    """Fingerprints of the pairs' own teacher datasets (None where a pair has none) and problems:
    a teacher dataset that cannot be built, or whose classes, channels or image size differ
    from a grid dataset its teacher would distil on."""
    fps: list[dict | None] = []
    problems: list[tuple[tuple[Any, ...], str]] = []
    for p_i, ref in enumerate(grid.teacher_datasets):
        if ref is None:
            fps.append(None)
            continue
        where = ("pairs", p_i, "teacher_dataset")
        try:
            tds = registry.load("datasets", ref.name)(**ref.params)
            fps.append(tds.fingerprint())
        except KdbenchError as e:
            problems.append((where, str(e)))
            fps.append(None)
            continue
        t_shape = _shape(tds)
        for d_ref, ds in zip(grid.datasets, datasets, strict=False):
            d_shape = _shape(ds)
            if t_shape and d_shape and t_shape != d_shape:
                problems.append(
                    (
                        where,
                        f"{ref.name} has (classes, channels, image size) {t_shape} but the student's "
                        f"dataset {d_ref.name} has {d_shape}; the teacher must see the same kind of images",
                    )
                )
    return fps, problems
