"""Typed records of a sweep: cells, teacher specs and cell results.

``grid.expand`` builds these; everything after it (runner, engine, store, report) reads
attributes, not string keys. On disk (``config.json``, ``result.json``, the store) a record is
its ``model_dump(mode="json")``; ``Cell.from_dict`` / ``CellResult.from_dict`` convert back at
that boundary and refuse a record of another cell format with a message saying what to do.

Ids: a cell's id is the hash of its JSON dump without presentation fields (the grid name and
the method's row label); a teacher's id is the hash of its spec. Fields added after format 1
(``OMIT_IF_DEFAULT``) are left out of the dump while they hold their default, so a grid that
does not use them keeps the ids it had (and its run directory's results).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from kdbench.errors import ConfigError, KdbenchError

#: the meaning of a cell dict; bump it (and say how to migrate) when a field changes meaning
CELL_FORMAT = 1


def canonical(obj: Any) -> str:
    """The JSON text that ids hash (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any, n: int = 16) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


class Record(BaseModel):
    """Frozen, strict base of every record; fields in ``OMIT_IF_DEFAULT`` are dumped only when set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self.OMIT_IF_DEFAULT:
                field = type(self).model_fields[name]
                if name in data and getattr(self, name) == field.get_default(call_default_factory=True):
                    del data[name]
        return data

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to disk (``model_dump(mode="json")``)."""
        return self.model_dump(mode="json")


class PluginKey(Record):
    """A resolved plugin reference as hashed: its name and every parameter (defaults filled in)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModelRef(PluginKey):
    """A student model: the plugin key plus its column label (``smallcnn(width=4)``)."""

    label: str


class DatasetRef(PluginKey):
    """A dataset plugin key plus the fingerprint of its files (so changed data is a new cell)."""

    fingerprint: dict[str, Any] = Field(default_factory=dict)


class SourceRef(PluginKey):
    """How a teacher is obtained (a ``kdbench.teachers`` plugin) plus its fingerprint."""

    fingerprint: dict[str, Any] = Field(default_factory=dict)


def short(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + " ".join(short(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


class MethodRef(Record):
    """A KD method: constructor ``params`` and the engine's loss-term ``weights``."""

    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"filled_by"})

    name: str
    label: str
    params: dict[str, Any] = Field(default_factory=dict)
    #: loss term -> weight, merged by the engine over the method's ``default_weights``
    weights: dict[str, Any] = Field(default_factory=dict)
    #: presentation (not in the id): parameters / "w.<term>" a protocol preset filled in -> preset
    filled_by: dict[str, str] = Field(default_factory=dict)

    def resolved(self) -> str:
        """Every parameter and weight as the cell runs it; preset-filled values marked ``(preset)``."""

        def mark(key: str) -> str:
            return f" ({self.filled_by[key]})" if key in self.filled_by else ""

        args = [f"{k}={short(v)}{mark(k)}" for k, v in sorted(self.params.items())]
        args += [f"w.{k}={short(v)}{mark('w.' + k)}" for k, v in sorted(self.weights.items())]
        return ", ".join(args)


#: the defaults of a ``swa:`` setting
#: the keys of a ``train.jtt`` setting and their defaults (kdbench/robustness/jtt.py runs it)
JTT_DEFAULTS: dict[str, Any] = {"epochs": 1, "lambda_up": 20, "seed": 0}


def check_jtt(value: Any) -> dict[str, Any] | None:
    """A ``train.jtt`` setting with every key (``epochs``, ``lambda_up``, ``seed``), or None (off)."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"jtt: expected a mapping {{epochs, lambda_up, seed}}, got {value!r}")
    unknown = sorted(set(value) - set(JTT_DEFAULTS))
    if unknown:
        raise ValueError(f"jtt: unknown key(s) {', '.join(unknown)}; use epochs, lambda_up, seed")
    out = {**JTT_DEFAULTS, **value}
    for k in ("epochs", "lambda_up"):
        if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] < 1:
            raise ValueError(f"jtt.{k} must be a whole number >= 1, got {out[k]!r}")
    if out["seed"] != "per_cell" and (isinstance(out["seed"], bool) or not isinstance(out["seed"], int)):
        raise ValueError(f"jtt.seed is a number or 'per_cell', got {out['seed']!r}")
    return out


SWA_DEFAULTS: dict[str, Any] = {"start": 0.75, "lr": None, "anneal_epochs": 1}


def check_swa(cfg: Any) -> dict[str, Any] | None:
    """A ``swa:`` setting (None/False, True, or a mapping) as SWA's full keyword arguments."""
    if cfg is None or cfg is False:
        return None
    if cfg is True:
        return dict(SWA_DEFAULTS)
    if not isinstance(cfg, dict):
        raise ConfigError(f"swa: expected true or a mapping {{start, lr, anneal_epochs}}, got {cfg!r}")
    unknown = set(cfg) - {"start", "lr", "anneal_epochs"}
    if unknown:
        raise ConfigError(f"swa: unknown key(s) {', '.join(sorted(unknown))}; use start, lr, anneal_epochs")
    start = cfg.get("start", 0.75)
    if not 0 <= start < 1:
        raise ConfigError(f"swa.start is a fraction of the epochs in [0, 1), got {start}")
    if cfg.get("lr") is not None and cfg["lr"] <= 0:
        raise ConfigError(f"swa.lr must be > 0, got {cfg['lr']}")
    if int(cfg.get("anneal_epochs", 1)) < 0:
        raise ConfigError("swa.anneal_epochs must be >= 0")
    return {**SWA_DEFAULTS, **cfg}


#: the defaults of ``teacher_outputs: replay`` and of its ``ferkd:`` calibration (the rule:
#: kdbench/engine/softlabels.py)
REPLAY_DEFAULTS: dict[str, Any] = {"mode": "replay", "store": "topk", "top_k": 10, "ferkd": None}
FERKD_DEFAULTS: dict[str, Any] = {"relabel_below": 0.1, "drop_above": 0.5, "smoothing": 0.1}


def check_teacher_outputs(cfg: Any) -> Any:
    """A ``teacher_outputs:`` setting as "compute" or the replay bank's full options."""
    if cfg is None or cfg == "compute" or (isinstance(cfg, dict) and cfg == {"mode": "compute"}):
        return "compute"
    if cfg == "replay":
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"teacher_outputs: expected compute, replay or a mapping {{mode: replay, store: topk | exact, "
            f"top_k, ferkd}}, got {cfg!r}"
        )
    unknown = set(cfg) - set(REPLAY_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"teacher_outputs: unknown key(s) {', '.join(sorted(unknown))}; use mode, store, top_k, ferkd"
        )
    out = {**REPLAY_DEFAULTS, **cfg}
    if out["mode"] != "replay":
        raise ConfigError(f"teacher_outputs.mode is compute or replay, got {out['mode']!r}")
    if out["store"] not in ("topk", "exact"):
        raise ConfigError(
            f"teacher_outputs.store is topk (fp16 top-k) or exact (fp32 logits), got {out['store']!r}"
        )
    if isinstance(out["top_k"], bool) or not isinstance(out["top_k"], int) or out["top_k"] < 1:
        raise ConfigError(f"teacher_outputs.top_k must be an integer >= 1, got {out['top_k']!r}")
    out["ferkd"] = _check_ferkd(out["ferkd"])
    return out


def _check_ferkd(cfg: Any) -> dict[str, Any] | None:
    if cfg is None or cfg is False:
        return None
    if cfg is True:
        return dict(FERKD_DEFAULTS)
    if not isinstance(cfg, dict):
        raise ConfigError(
            "teacher_outputs.ferkd: expected true or a mapping {relabel_below, drop_above, smoothing}, "
            f"got {cfg!r}"
        )
    unknown = set(cfg) - set(FERKD_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"teacher_outputs.ferkd: unknown key(s) {', '.join(sorted(unknown))}; "
            "use relabel_below, drop_above, smoothing"
        )
    out = {**FERKD_DEFAULTS, **cfg}
    for k in ("relabel_below", "drop_above", "smoothing"):
        if not isinstance(out[k], int | float) or isinstance(out[k], bool) or not 0 <= out[k] <= 1:
            raise ConfigError(f"teacher_outputs.ferkd.{k} is a probability in [0, 1], got {out[k]!r}")
    return {k: float(v) for k, v in out.items()}


class TrainRecipe(Record):
    """How a model is trained (the student's ``train``, the teacher's ``teacher_train``)."""

    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset(
        {"teacher_view", "precision", "channels_last", "compile", "sampler", "swa", "method"}
        | {"gpus_per_cell", "nodes", "sync_bn", "objective", "jtt", "teacher_outputs"}
    )

    preset: Literal["repdistiller", "mdistiller", "quick"] | None = None
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[float] = Field(default_factory=lambda: [0.625, 0.75, 0.875])
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: int = Field(0, ge=0)
    #: learning rate of a method's initialisation stage (AB, FT, FSP); None = ``lr``
    init_lr: float | None = Field(None, gt=0)
    augment: Any = "none"
    views: dict[str, Any] = Field(default_factory=lambda: {"strong": "randaugment"})
    device: str = "auto"
    checkpoint_every: int = Field(1, ge=0)
    #: what the teacher sees: "student" (the student's batch, the default), "clean", or an augmenter
    teacher_view: Any = "student"
    #: batch order: "shuffle", or "group_balanced" (every group equally likely; needs group metadata)
    sampler: Literal["shuffle", "group_balanced"] = "shuffle"
    #: training arithmetic: fp32, or autocast to bf16 / fp16 (fp16 with a GradScaler)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: models (and 4-d inputs) in channels_last memory format
    channels_last: bool = False
    #: torch.compile the student and the teacher (in place, ``nn.Module.compile``)
    compile: bool = False
    #: stochastic weight averaging of the train stage (kdbench/robustness/swa.py): true or
    #: {start: 0.75, lr: null (half the lr), anneal_epochs: 1}, stored with every key; None: off
    swa: dict[str, Any] | None = None
    #: DDP inside the cell (kdbench/engine/distributed.py): ranks per node (one GPU each, or CPU ranks
    #: on gloo) and nodes; ``batch_size`` stays the GLOBAL batch (each rank takes 1/N of every batch)
    gpus_per_cell: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    #: BatchNorm statistics over the global batch (SyncBatchNorm) instead of each rank's share
    sync_bn: bool = False
    #: teacher_train only: a teacher-free ``kdbench.losses`` plugin the teacher trains with instead of
    #: plain cross-entropy, resolved to {name, params} (e.g. the tolerant teacher); None: CE
    method: Any = None
    #: the student's cross-entropy term replaced by a group objective (kdbench/methods/groupdro.py):
    #: "groupdro" or {groupdro: {step_size, adjustment}}, stored as {name, params}; None: CE
    objective: Any = None
    #: Just Train Twice (kdbench/robustness/jtt.py): {epochs: T, lambda_up, seed}, the error set of
    #: a T-epoch ERM model upsampled lambda_up times; None: off
    jtt: dict[str, Any] | None = None
    #: the teacher's outputs while distilling: "compute" (its forward every step) or a soft-label bank
    #: replayed (kdbench/engine/softlabels.py), stored with every key: {mode: replay, store, top_k, ferkd}
    teacher_outputs: Any = "compute"

    @model_validator(mode="after")
    def _global_batch_divides(self) -> TrainRecipe:
        ranks = self.gpus_per_cell * self.nodes
        if self.batch_size % ranks:
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch of gpus_per_cell x nodes = {ranks} "
                f"ranks and must be a multiple of {ranks}"
            )
        if self.objective is not None and ranks > 1:
            raise ValueError(
                "objective groupdro weights groups by the losses of the whole batch, and under DDP each "
                "rank sees only its shard; run it with gpus_per_cell: 1 and nodes: 1"
            )
        return self

    @field_validator("objective", mode="before")
    @classmethod
    def _check_objective(cls, v: Any) -> Any:
        if v is None:
            return v
        from kdbench.methods.groupdro import check_objective

        return check_objective(v)

    @field_validator("jtt", mode="before")
    @classmethod
    def _check_jtt(cls, v: Any) -> Any:
        if v is None:
            return v
        return check_jtt(v)

    @field_validator("teacher_outputs", mode="before")
    @classmethod
    def _check_teacher_outputs(cls, v: Any) -> Any:
        try:
            return check_teacher_outputs(v)
        except KdbenchError as e:
            raise ValueError(str(e)) from None

    @field_validator("swa", mode="before")
    @classmethod
    def _check_swa(cls, v: Any) -> Any:
        try:
            return check_swa(v)
        except KdbenchError as e:
            raise ValueError(str(e)) from None


class EvalSpec(Record):
    """Evaluation settings that are part of a cell (``val_fraction``/``every`` only when set)."""

    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset(
        {"val_fraction", "every", "dfr", "dfr_procedure", "corruptions", "severities", "corruption_seed"}
        | {"corruptions_root"}
    )

    batch_size: int = Field(512, ge=1)
    ece_bins: int = Field(15, ge=1)
    #: stratified, seeded share of the training split held out as "val" (0 = none)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    #: evaluate every N epochs into metrics.jsonl (0 = the final model only)
    every: int = Field(0, ge=0)
    #: Deep Feature Reweighting of the finished student (data with groups): "dfr/..." metrics
    dfr: bool = False
    #: how DFR fits its last layer: "paper" (Kirichenko et al.: L1, C tuned on half the held-out
    #: split, 20 retrains, training-split standardisation) or "fixed_l2" (kdbench's earlier one)
    dfr_procedure: Literal["paper", "fixed_l2"] = "paper"
    #: corrupted test sets "c/<corruption>/<severity>" (kdbench/datasets/cifar_c.py): "all" or names
    corruptions: str | list[str] | None = None
    #: their severities (None: 1..5), seed of the random corruptions (None: 0), and a CIFAR-10-C /
    #: CIFAR-100-C folder to read instead of generating (alone it means all corruptions)
    severities: list[int] | None = None
    corruption_seed: int | None = None
    corruptions_root: str | None = None

    @field_validator("corruptions", "severities")
    @classmethod
    def _known_corruptions(cls, v: Any, info: Any) -> Any:
        from kdbench.robustness.corruptions import ALL, SEVERITIES

        if v is None:
            return v
        if info.field_name == "severities":
            bad = [s for s in v if s not in SEVERITIES]
            if bad or not v:
                raise ValueError(f"severities are 1..5, got {v}")
            return v
        names = [v] if isinstance(v, str) else v
        bad = [n for n in names if n not in ALL and n not in ("all", "extra")]
        if bad:
            raise ValueError(
                f"unknown corruption {', '.join(map(repr, bad))}; 'all' (the 15), 'extra' (the release's "
                f"four more) or: {', '.join(ALL)}"
            )
        return v


class TeacherSpec(Record):
    """Everything that determines a trained teacher; ``id`` is the hash of the rest."""

    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"val_fraction"})

    format: int = CELL_FORMAT
    model: PluginKey
    label: str
    source: SourceRef
    #: the teacher's own training data (the pair's ``teacher_dataset``, else the cell's dataset)
    dataset: DatasetRef
    train: TrainRecipe
    augment: PluginKey
    seed: int
    plugins: dict[str, str] = Field(default_factory=dict)
    #: the held-out validation share of ``dataset`` the teacher must not train on (= the cell's)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    id: str = ""

    def content_id(self) -> str:
        return digest(self.model_dump(mode="json", exclude={"id"}))

    @classmethod
    def build(cls, **fields: Any) -> TeacherSpec:
        """A spec with its id computed."""
        spec = cls(**fields)
        return spec.model_copy(update={"id": spec.content_id()})


class Cell(Record):
    """One (dataset, pair, method, seed) of a grid, fully resolved."""

    format: int = CELL_FORMAT
    #: the grid's name (presentation: not part of the id)
    grid: str
    dataset: DatasetRef
    student: ModelRef
    teacher: TeacherSpec
    uses_teacher: bool
    method: MethodRef
    seed: int
    train: TrainRecipe
    augment: PluginKey
    #: extra named augmented views of the batch some methods read (e.g. "strong")
    views: dict[str, PluginKey] = Field(default_factory=dict)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    plugins: dict[str, str] = Field(default_factory=dict)
    id: str = ""

    def content_id(self) -> str:
        """The hash of everything that determines the result (not the grid name or row label)."""
        d = self.model_dump(mode="json", exclude={"id", "grid"})
        d["method"].pop("label", None)
        d["method"].pop("filled_by", None)
        return digest(d)

    @classmethod
    def build(cls, **fields: Any) -> Cell:
        """A cell with its id computed."""
        cell = cls(**fields)
        return cell.model_copy(update={"id": cell.content_id()})

    @property
    def describe(self) -> str:
        """One line naming the cell (progress lines, errors)."""
        return (
            f"{self.method.label} {self.teacher.label}→{self.student.label} "
            f"{self.dataset.name} seed {self.seed}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | Cell, where: str = "cell") -> Cell:
        """A cell from its JSON dict (``config.json``, the store); refuses other formats clearly.

        ``where`` names the source in the message (a file path, "the store of runs/x").
        The id is recomputed: a record whose content no longer hashes to its id was written
        by a kdbench that serialised cells differently, and is refused the same way.
        """
        if isinstance(data, Cell):
            return data
        if not isinstance(data, dict):
            raise KdbenchError(f"{where}: expected a cell record (a JSON object), got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != CELL_FORMAT:
            raise CellFormatError(where, fmt)
        try:
            cell = cls.model_validate(data)
        except ValidationError as e:
            raise CellFormatError(where, fmt, _first_error(e)) from None
        if "id" not in data:
            return cell.model_copy(update={"id": cell.content_id()})
        if cell.content_id() != data["id"]:
            raise CellFormatError(where, fmt, f"its content no longer hashes to its id {data['id']}")
        return cell


class CellResult(Record):
    """What running a cell produced: the type every run path returns and the store records
    (``result.json`` is its JSON dump)."""

    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"retryable", "retry_attempt"})

    cell: Cell
    status: Literal["done", "failed", "pending"]
    metrics: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    env: dict[str, Any] = Field(default_factory=dict)
    wall_s: float | None = None
    attempt: int = 1
    error: str | None = None
    #: a failure that may pass on another attempt (its worker died, it hit the time limit);
    #: a NaN loss or a config error is not retryable
    retryable: bool = False
    #: set by the retry policy on a failed attempt that runs again: the next attempt's number
    retry_attempt: int | None = None

    @property
    def id(self) -> str:
        return self.cell.id

    @classmethod
    def failed(
        cls, cell: Cell, attempt: int, error: str, retryable: bool = False, wall_s: float = 0.0
    ) -> CellResult:
        """The result of a cell that failed before or outside its own code could say so."""
        return cls(
            cell=cell, status="failed", error=error, attempt=attempt, retryable=retryable, wall_s=wall_s
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | CellResult, where: str = "result") -> CellResult:
        if isinstance(data, CellResult):
            return data
        if not isinstance(data, dict) or not isinstance(data.get("cell"), dict | Cell):
            raise KdbenchError(f"{where}: not a cell result (no 'cell' object)")
        cell = Cell.from_dict(data["cell"], where)
        try:
            return cls.model_validate({**data, "cell": cell})
        except ValidationError as e:
            raise KdbenchError(f"{where}: malformed cell result: {_first_error(e)}") from None


class CellFormatError(KdbenchError):
    """A stored cell of another format (older or newer kdbench)."""

    def __init__(self, where: str, fmt: Any, detail: str | None = None):
        self.where, self.format = where, fmt
        what = f"cell format {fmt}" if fmt is not None else "no cell format"
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"{where}: written with {what}{why}; this kdbench reads cell format {CELL_FORMAT}. "
            f"Run the grid into a new run directory (`kdbench run GRID --out NEW_DIR`), or open "
            f"this one with the kdbench version that wrote it."
        )


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg'].lower()}" if loc else err["msg"].lower()


def _entry(d: dict[str, Any]) -> tuple:
    """What a cell is in its grid (presentation), independent of its content hash."""
    try:
        return (
            d.get("grid"),
            d["dataset"]["name"],
            d["teacher"]["label"],
            d["student"]["label"],
            d["method"]["label"],
            d["seed"],
        )
    except (KeyError, TypeError):
        return ()


def _diff(a: Any, b: Any, path: str, depth: int, out: set[str]) -> None:
    if a == b:
        return
    if depth and isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ("id", "label", "filled_by", "grid"):
                continue
            _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k, depth - 1, out)
    else:
        out.add(path or "(all)")


def changed_entries(planned: list[Cell], stored: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Stored cell dicts that are the same grid entry as a planned cell (grid, dataset, pair,
    method label, seed) under another id, grouped by what differs: ``{"dataset.fingerprint":
    [old ids]}``. Explains why finished cells of a run directory run again (a new kdbench that
    fingerprints data differently, a changed plugin version, an edited train setting)."""
    by_entry = {_entry(c.to_dict()): c for c in planned}
    ids = {c.id for c in planned}
    out: dict[str, list[str]] = {}
    for d in stored:
        if not isinstance(d, dict) or d.get("id") in ids:
            continue
        cell = by_entry.get(_entry(d))
        if cell is None:
            continue
        if d.get("format") != CELL_FORMAT:
            what = {f"cell format {d.get('format')} -> {CELL_FORMAT}"}
        else:
            what = set()
            _diff(d, cell.to_dict(), "", 3, what)
        out.setdefault(", ".join(sorted(what)) or "(nothing visible)", []).append(str(d.get("id")))
    return out


@dataclass(frozen=True)
class Job:
    """What an executor runs at once: one cell, or a lockstep group of cells sharing a teacher
    (``executor.share_teacher``), with the attempt number of each, the run directory, the
    intra-op threads, the wall-time limit of an attempt (``executor.time_limit``) and the grid's
    ``loggers`` (None: the defaults; presentation, so not part of any cell)."""

    cells: tuple[Cell, ...]
    attempts: tuple[int, ...]
    run_dir: str
    threads: int = 1
    time_limit: float | None = None
    loggers: tuple[PluginKey, ...] | None = None

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cells]

    @property
    def first(self) -> Cell:
        return self.cells[0]

    def attempt_of(self, cell_id: str) -> int:
        return self.attempts[self.ids.index(cell_id)]

    def only(self, cell_ids: set[str], attempts: dict[str, int]) -> Job:
        """The same job for some of its cells, at their ``attempts`` (a retry)."""
        cells = tuple(c for c in self.cells if c.id in cell_ids)
        return replace(self, cells=cells, attempts=tuple(attempts[c.id] for c in cells))
