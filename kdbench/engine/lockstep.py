"""Teacher sharing: the cells of a grid that feed one teacher the same batches train in lockstep.

Cells that agree on the teacher, the data, the seed, the batch size, the sampler and the views
(:func:`group_key`) draw the same batches in the same order, because a cell's data order and
augmentation come only from its seed. :func:`run_group` runs such a group in one process: every
cell keeps its own :func:`~kdbench.engine.cell.run_cell_steps` generator (its own trainer,
optimiser, hooks, generators, checkpoint, log and result), and the group advances them one
optimiser step at a time. Around each cell's step the process-global RNG states (torch, CUDA,
``random``, NumPy) are swapped in and out, so each cell draws exactly the numbers it would draw
alone. One teacher module serves the group (:class:`SharedTeachers`): it reads the union of the
taps the group's methods need, and a forward is reused only when its input is bitwise equal to
the one a previous cell of the same step fed it (``torch.equal``), so results are bit-identical
to running the cells one by one, on any method, view or failure. The set-up probe (every tap of
each model on the first 256 training images, for the method's shapes and probe features) is
shared too: the teacher's once per group, a student's when it is bitwise the same model (same
architecture, seed and data: the same initial weights) on the same probe batch.

Why lockstep rather than replay (teacher outputs stored per step on disk): large features
(FitNet's hints, attention maps) are shared at no storage cost, nothing can go stale, and
resume needs nothing beyond each cell's own checkpoint. A cell that fails (a NaN loss) records
its failure and leaves the group; the rest go on. A group interrupted and run again resumes
each cell from its own last checkpoint; cells that are behind step alone (the group always
advances the cells at the earliest position) until they catch up, then share again. On a stop
request (SIGTERM, :func:`~kdbench.engine.train.request_stop`) every cell of the group checkpoints
at its next step boundary before the group stops.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from kdbench import registry
from kdbench.artifacts import write_json_atomic
from kdbench.cells import Cell, CellResult, PluginKey
from kdbench.engine.train import Progress, StepPos, StopRequested
from kdbench.features import FeatureReader, Features, TapSpec, probe_features

#: teacher forwards kept per group for reuse (the current step's inputs: one per distinct view)
CACHE_ENTRIES = 4
_STAGE_RANK = {"init": 0, "train": 1}


# ------------------------------------------------------------------------------- grouping


def group_key(cell: Cell) -> str | None:
    """Cells with the same key feed their teacher the same inputs; None: no teacher to share."""
    if not cell.uses_teacher or cell.train.gpus_per_cell * cell.train.nodes > 1:
        return None  # no teacher to share, or a DDP cell (its own processes)
    method_cls = registry.load("losses", cell.method.name)
    tv = cell.train.teacher_view
    if tv in (None, "student"):
        tv = getattr(method_cls, "teacher_view", None) or "student"
    tr = cell.train
    key = {
        "teacher": cell.teacher.id,
        "dataset": cell.dataset.model_dump(mode="json"),
        "seed": cell.seed,
        "batch_size": tr.batch_size,
        "sampler": dict(tr).get("sampler"),
        "jtt": dict(tr).get("jtt"),  # its upsampled error set changes the batches
        "augment": cell.augment.model_dump(mode="json"),
        "teacher_view": tv,
        "device": tr.device,
        "val_fraction": cell.eval.val_fraction,
        # what changes the teacher's arithmetic: its forward runs under the autocast, memory
        # format and compilation of the cell that computes it, and is reused by the others
        "precision": tr.precision,
        "channels_last": tr.channels_last,
        "compile": tr.compile,
        "student_view": _student_view_key(cell, method_cls),
    }
    return json.dumps(key, sort_keys=True, default=str)


def _student_view_key(cell: Cell, method_cls: Any) -> Any:
    """The method's student view (a composed view changes what a "clean" teacher sees)."""
    wanted = getattr(method_cls, "student_view", None)
    return None if wanted is None else cell.views.get(wanted, wanted)


def plan_groups(cells: Iterable[Cell]) -> list[list[Cell]]:
    """``cells`` partitioned into lockstep groups (first-seen order; cells without a teacher alone)."""
    groups: dict[str, list[Cell]] = {}
    out: list[list[Cell]] = []
    for c in cells:
        k = group_key(c)
        if k is None:
            out.append([c])
        elif k in groups:
            groups[k].append(c)
        else:
            groups[k] = [c]
            out.append(groups[k])
    return out


def balance_groups(groups: list[list[Cell]], slots: int, teacher_cost: float = 1.0) -> list[list[Cell]]:
    """``groups`` cut so that ``slots`` workers finish soonest. A lockstep group runs in one
    worker, so one big group beside a few lone cells would leave workers idle: the largest group
    is halved while that shortens the busiest worker's share, or costs it nothing while workers
    would idle (cost model: one unit per cell, plus ``teacher_cost`` per group with a teacher,
    jobs dealt longest first). A group's numbers
    are bitwise those of its cells run alone, so the cut changes no number, only the time."""

    def cost(g: list[Cell]) -> float:
        return len(g) + (teacher_cost if group_key(g[0]) is not None else 0.0)

    def makespan(gs: list[list[Cell]]) -> float:
        loads = [0.0] * max(1, slots)
        for c in sorted((cost(g) for g in gs), reverse=True):
            loads[loads.index(min(loads))] += c
        return max(loads)

    out = [list(g) for g in groups]
    while slots > 1 and out:
        big = max(range(len(out)), key=lambda i: len(out[i]))
        g = out[big]
        if len(g) < 2:
            break
        half = (len(g) + 1) // 2
        trial = out[:big] + [g[:half], g[half:]] + out[big + 1 :]
        before, after = makespan(out), makespan(trial)
        if after > before or (after == before and len(out) >= slots):  # idle workers cut for free
            break
        out = trial
    return out


# ------------------------------------------------------------------------- shared teacher


@dataclass
class _Entry:
    x: Tensor
    feats: Features
    #: the version counters of ``feats``' tensors when computed: a method that edits the
    #: shared features in place bumps them, and the entry is no longer lent to anyone
    versions: list[int]


def _tensors(f: Features) -> list[Tensor]:
    return [t for t in (f.logits, *f.stages, *f.preact, *f.blocks, f.pooled) if t is not None]


def _versions(f: Features) -> list[int]:
    return [t._version for t in _tensors(f)]


def _same_input(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _clone(f: Features) -> Features:
    """A copy a cell may keep and even modify in place without touching the others' copies."""
    return Features(
        logits=None if f.logits is None else f.logits.clone(),
        stages=[t.clone() for t in f.stages],
        preact=[t.clone() for t in f.preact],
        pooled=None if f.pooled is None else f.pooled.clone(),
        blocks=[t.clone() for t in f.blocks],
    )


def _state(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer (persistent or not) of ``model``, by name."""
    return [*model.named_parameters(), *model.named_buffers()]


def _same_state(a: list[tuple[str, Tensor]], b: list[tuple[str, Tensor]]) -> bool:
    return len(a) == len(b) and all(
        na == nb and _same_input(ta.detach(), tb.detach()) for (na, ta), (nb, tb) in zip(a, b, strict=True)
    )


@dataclass
class _Probe:
    key: str  # the model's plugin reference (a student) or "" (a lent teacher)
    spec: TapSpec
    model: nn.Module | None  # a lent (frozen) teacher: the module itself
    state: list[tuple[str, Tensor]] | None  # a student: a copy of its weights when probed
    x: Tensor
    feats: Features


class _Union:
    """One teacher module read once per distinct input, with the union of the taps asked for."""

    def __init__(self, model: nn.Module, spec: TapSpec):
        self.model, self.spec = model, spec
        self.wanted: set[str] = {"logits"}
        self.reader: FeatureReader | None = None
        self.entries: list[_Entry] = []
        self.hits = self.misses = self.edited = 0
        self.seconds = 0.0  # in the forwards computed (misses)

    def want(self, taps: Iterable[str]) -> None:
        new = self.wanted | set(taps)
        if new != self.wanted or self.reader is None:
            if self.reader is not None:
                self.reader.close()
            self.wanted = new
            self.reader = FeatureReader(self.model, self.spec, sorted(new))
            self.entries.clear()

    def read(self, x: Tensor) -> Features:
        for e in self.entries:
            if _same_input(e.x, x):
                if _versions(e.feats) != e.versions:  # edited in place by the cell it was lent to
                    self.entries.remove(e)
                    self.edited += 1
                    break
                self.hits += 1
                return e.feats
        assert self.reader is not None
        self.misses += 1
        t0 = time.perf_counter()
        feats = self.reader.read(x)
        self.seconds += time.perf_counter() - t0
        self.entries.append(_Entry(x.detach().clone(), feats, _versions(feats)))
        del self.entries[:-CACHE_ENTRIES]
        return feats

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.entries.clear()


class SharedReader:
    """A cell's view of the shared teacher: the taps it asked for, nothing more (fresh ``cache``)."""

    def __init__(self, union: _Union, wanted: Iterable[str]):
        self.union = union
        self.wanted = set(wanted)
        self.model = union.model
        self.spec = union.spec

    def read(self, x: Tensor) -> Features:
        f = self.union.read(x)
        w = self.wanted
        return Features(
            logits=f.logits,
            stages=list(f.stages) if "stages" in w else [],
            preact=list(f.preact) if "preact" in w else [],
            pooled=f.pooled if "pooled" in w else None,
            blocks=list(f.blocks) if "blocks" in w else [],
        )

    def close(self) -> None:
        """The group closes the shared reader."""


class SharedTeachers:
    """Lends one loaded teacher per (teacher id, device) to every cell of a group.

    ``obtain``, ``reader`` and ``probe`` replace :func:`~kdbench.engine.cell.obtain_teacher`,
    :class:`FeatureReader` for the teacher and the set-up probe inside
    :func:`~kdbench.engine.cell.run_cell_steps`.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], tuple[nn.Module, TapSpec]] = {}
        self._unions: dict[int, _Union] = {}
        self._probes: list[_Probe] = []
        self._closed: dict[str, float] = {"hits": 0, "misses": 0, "teacher_s": 0.0}
        self._probe_stats = {"probe_hits": 0, "probe_misses": 0}
        self._student_key: str | None = None

    def obtain(
        self,
        spec: Any,
        run_dir: Path,
        device: torch.device,
        eval_batch_size: int = 512,
        ece_bins: int = 15,
        progress: Progress | None = None,
    ) -> tuple[nn.Module, TapSpec]:
        from kdbench.engine.cell import obtain_teacher

        key = (spec.id, str(device))
        if key not in self._models:
            self._models[key] = obtain_teacher(spec, run_dir, device, eval_batch_size, ece_bins, progress)
        return self._models[key]

    def reader(self, model: nn.Module, spec: TapSpec, wanted: Iterable[str]) -> SharedReader:
        u = self._unions.get(id(model))
        if u is None:
            u = self._unions[id(model)] = _Union(model, spec)
        u.want(wanted)
        return SharedReader(u, wanted)

    def probe(self, model: nn.Module, spec: TapSpec, x: Tensor) -> Features:
        """:func:`~kdbench.features.probe_features` computed once per (model, weights, batch) in the group.

        A lent teacher matches itself. A student (the cell being set up, :meth:`setting_up`)
        matches an earlier student built from the same plugin reference whose parameters and
        buffers were bitwise the same when it was probed (cells with one student and seed start
        from the same weights). Each caller gets its own copy. Like the teacher's forward during
        training, a probe must not draw from the global RNG (eval mode: no dropout).
        """
        lent = any(model is m for m, _ in self._models.values())
        key = "" if lent else self._student_key
        if key is None or any(is_lazy(p) for p in model.parameters()):
            return probe_features(model, spec, x)  # unknown origin, or a forward that initialises weights
        state = None if lent else _state(model)
        for p in self._probes:
            if p.key != key or p.spec != spec or not _same_input(p.x, x):
                continue
            same = (p.model is model) if lent else (p.state is not None and _same_state(p.state, state or []))
            if same:
                self._probe_stats["probe_hits"] += 1
                return _clone(p.feats)
        self._probe_stats["probe_misses"] += 1
        feats = probe_features(model, spec, x)
        kept = None if state is None else [(n, t.detach().clone()) for n, t in state]
        self._probes.append(_Probe(key, spec, model if lent else None, kept, x.clone(), feats))
        return _clone(feats)

    def setting_up(self, cell: Cell | None) -> None:
        """``cell`` is the one setting up now (its student may share a probe); None: none is."""
        self._student_key = (
            None if cell is None else json.dumps(cell.student.model_dump(mode="json"), sort_keys=True)
        )

    def end_setup(self) -> None:
        """Every cell has set up: drop the probes (their features can be large)."""
        self._probes.clear()

    def new_step(self) -> None:
        """Forget the previous step's inputs (every cell has moved on)."""
        for u in self._unions.values():
            u.entries.clear()

    @property
    def stats(self) -> dict[str, float]:
        """Teacher forwards reused (``hits``) and computed (``misses``), the seconds those
        forwards took (``teacher_s``), and set-up probes reused and computed."""
        us = self._unions.values()
        return {
            "hits": self._closed["hits"] + sum(u.hits for u in us),
            "misses": self._closed["misses"] + sum(u.misses for u in us),
            "teacher_s": self._closed["teacher_s"] + sum(u.seconds for u in us),
            **self._probe_stats,
        }

    def close(self) -> None:
        self._closed = {k: v for k, v in self.stats.items() if k in self._closed}
        for u in self._unions.values():
            u.close()
        self._unions.clear()
        self._models.clear()
        self._probes.clear()


# ------------------------------------------------------------------------------- the group


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, py, npy = state
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    np.random.set_state(npy)


@dataclass
class _Slot:
    cell: Cell
    gen: Any
    rng: tuple
    pos: StepPos | None = None
    result: CellResult | None = None
    stopped: bool = False
    #: the teacher forwards this cell's steps computed and those it reused from a neighbour
    computed: int = 0
    reused: int = 0

    def rank(self) -> tuple[int, int, int]:
        assert self.pos is not None
        stage, epoch, step = self.pos
        return _STAGE_RANK.get(stage, 1), epoch, step


def _advance(slot: _Slot) -> None:
    """One step of ``slot``'s cell with its own global RNG state in place."""
    _set_rng_state(slot.rng)
    try:
        slot.pos = next(slot.gen)
    except StopIteration as e:
        slot.pos, slot.result = None, e.value
    except StopRequested:
        slot.stopped = True
        raise
    finally:
        slot.rng = _rng_state()


def run_group(
    cells: Iterable[Cell],
    run_dir: Path,
    progress: Callable[[Cell], Progress | None] | None = None,
    attempts: dict[str, int] | None = None,
    on_result: Callable[[CellResult], None] | None = None,
    teachers: SharedTeachers | None = None,
    timings: dict[str, float] | None = None,
    loggers: Sequence[PluginKey] | None = None,
) -> list[CellResult]:
    """Run ``cells`` (one :func:`group_key`) side by side, sharing their teacher; their results.

    Each cell writes exactly what :func:`~kdbench.engine.cell.run_cell` writes and gets the same
    numbers. ``progress(cell)`` gives a cell's per-epoch callback; ``on_result`` is called with
    each result as the cell finishes (cells may finish in any order). ``teachers``: pass one to
    read its ``stats`` afterwards. ``timings`` (a dict) receives the seconds spent setting the
    cells up (``setup_s``), in steps that left a cell at its next step (``steps_s``, over
    ``step_calls`` of them; the teacher's forwards in them: ``teacher_step_forwards`` taking
    ``teacher_steps_s``) and in each cell's last call (``finish_s``: its last step, evaluation
    and result). ``loggers``: the grid's (None: the defaults); each cell logs to its own runs.
    """
    group = _Group(list(cells), Path(run_dir), progress, attempts or {}, on_result, teachers, loggers)
    try:
        group.run()
    finally:
        group.close()
        if timings is not None:
            timings.update(group.clock)
    return [group.results[c.id] for c in group.cells if c.id in group.results]


class _Group:
    """The cells of one lockstep group, each a generator of steps, advanced one step at a time."""

    def __init__(self, cells, run_dir, progress, attempts, on_result, teachers, loggers=None) -> None:
        from kdbench.engine.cell import run_cell_steps

        self.cells, self.on_result, self.run_dir = cells, on_result, run_dir
        self.teachers = teachers if teachers is not None else SharedTeachers()
        self.start = _rng_state()
        self.slots = []
        for c in cells:
            steps = run_cell_steps(
                c, run_dir, progress(c) if progress else None, attempts.get(c.id, 1), self.teachers, loggers
            )
            self.slots.append(_Slot(c, steps, self.start))
        self.results: dict[str, CellResult] = {}
        names = ("setup_s", "steps_s", "finish_s", "step_calls", "teacher_steps_s", "teacher_step_forwards")
        self.clock = dict.fromkeys(names, 0.0)

    def run(self) -> None:
        """Set every cell up, then step the cells at the earliest position until all finish; on
        a stop request every other cell also checkpoints at its next step boundary."""
        try:
            live = self._set_up()
            while live:
                first = min(s.rank() for s in live)
                self.teachers.new_step()
                for s in [s for s in live if s.rank() == first]:
                    self._timed(s)
                    if s.pos is None:
                        live.remove(s)
                        self._finish(s)
        except StopRequested:
            self._stop_all()
            raise

    def _set_up(self) -> list[_Slot]:
        """Each cell up to its first step (teacher, models, resume); the cells still to train."""
        live: list[_Slot] = []
        for s in self.slots:
            self.teachers.setting_up(s.cell)
            try:
                self._timed(s, setup=True)
            finally:
                self.teachers.setting_up(None)
            if s.pos is None:
                self._finish(s)
            else:
                live.append(s)
        self.teachers.end_setup()
        return live

    def _timed(self, s: _Slot, setup: bool = False) -> None:
        t0, before = time.perf_counter(), self.teachers.stats
        try:
            _advance(s)
        finally:
            kind = "setup_s" if setup else "steps_s" if s.pos is not None else "finish_s"
            self.clock[kind] += time.perf_counter() - t0
            after = self.teachers.stats
            s.computed += int(after["misses"] - before["misses"])
            s.reused += int(after["hits"] - before["hits"])
            if kind == "steps_s":
                self.clock["step_calls"] += 1
                self.clock["teacher_steps_s"] += after["teacher_s"] - before["teacher_s"]
                self.clock["teacher_step_forwards"] += after["misses"] - before["misses"]

    def _finish(self, s: _Slot) -> None:
        assert s.result is not None
        if s.result.status == "done":  # what sharing saved, in the result's env (and result.json)
            shared = {"computed": s.computed, "reused": s.reused, "group": len(self.cells)}
            s.result = s.result.model_copy(update={"env": {**s.result.env, "teacher_forwards": shared}})
            write_json_atomic(self.run_dir / "cells" / s.cell.id / "result.json", s.result)
        self.results[s.cell.id] = s.result
        if self.on_result is not None:
            self.on_result(s.result)

    def _stop_all(self) -> None:
        for s in self.slots:
            if s.pos is not None and not s.stopped:
                try:
                    _advance(s)
                except StopRequested:
                    pass
                if s.pos is None and s.result is not None:
                    self._finish(s)

    def close(self) -> None:
        for s in self.slots:
            s.gen.close()
        _set_rng_state(self.start)
        self.teachers.close()
