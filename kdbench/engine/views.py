"""What each model sees of a training batch: the rule, in one place.

* The **base** view is the grid's ``train.augment`` (``flip_crop`` under the repdistiller
  preset, ``none`` by default).
* A method with a ``student_view`` (consistency: ``"strong"``) gets that view **on top of** the
  base: the student sees ``student_view(base(x))`` (the Keras consistency recipe: flip + crop,
  then RandAugment). Without one the student sees ``base(x)``.
* The teacher sees the student's batch (``"student"``, the default), the base-augmented batch
  (``"clean"``: clean of the method's extra view; the raw batch when the base is ``none``), or
  its own augmenter applied to the raw batch. A grid's ``train.teacher_view`` other than
  ``"student"`` wins over the method's.

A ``student_view`` naming neither a view of ``train.views`` nor an augmenter is a config error
(preflight reports it with the grid line before anything trains).
"""

from __future__ import annotations

from typing import Any

from kdbench import registry
from kdbench.cells import Cell, PluginKey
from kdbench.errors import ConfigError


def _name(ref: Any) -> str:
    """An augmenter's name (its parameters are in the cell's config)."""
    if isinstance(ref, PluginKey):
        return ref.name
    return ref["name"] if isinstance(ref, dict) else str(ref)


def student_view(cell: Cell, method_cls: Any) -> PluginKey | dict | None:
    """The method's extra student view as an augmenter reference, or None."""
    wanted = getattr(method_cls, "student_view", None)
    if wanted is None:
        return None
    if wanted in cell.views:
        return cell.views[wanted]
    if wanted in registry.names("augmenters"):
        return {"name": wanted, "params": {}}
    raise ConfigError(
        f"method {cell.method.name} trains the student on the view {wanted!r}, which train.views "
        f"lacks ({', '.join(cell.views) or 'none defined'}) and which names no augmenter; add "
        f"`views: {{{wanted}: randaugment}}` to train, or remove the method"
    )


def teacher_view(cell: Cell, method_cls: Any) -> Any:
    """The grid's ``train.teacher_view`` when it is not the default, else the method's choice."""
    grid = cell.train.teacher_view
    if grid not in (None, "student"):
        return grid
    return getattr(method_cls, "teacher_view", None) or "student"


def describe(cell: Cell, method_cls: Any | None = None) -> dict[str, str]:
    """``{"student": "flip_crop + randaugment", "teacher": "flip_crop"}``: the resolved views
    of ``cell`` (shown by ``kdbench run --dry-run`` and recorded in every result's env)."""
    if method_cls is None:
        method_cls = registry.load("losses", cell.method.name)
    base = _name(cell.augment)
    extra = student_view(cell, method_cls)
    student = base if extra is None else (_name(extra) if base == "none" else f"{base} + {_name(extra)}")
    tv = teacher_view(cell, method_cls)
    if not cell.uses_teacher:
        teacher = "-"
    elif tv == "student":
        teacher = student
    elif tv == "clean":
        teacher = base
    else:
        teacher = _name(tv if not isinstance(tv, str) else {"name": tv})
    return {"student": student, "teacher": teacher}
