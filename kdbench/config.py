"""Reading and validating ``grid.yaml``.

Every problem is collected before anything is reported, and each names the file, the line
and the key path (``grid.yaml:12: methods[2].dkd.T: expected a number, got 'four'``).
Plugin parameters are checked against the plugin's own signature.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from kdbench import registry
from kdbench.cells import EvalSpec, TrainRecipe
from kdbench.errors import ConfigError, KdbenchError

# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(TrainRecipe):
    """How a model is trained (students: ``train``; teachers: ``teacher_train``).

    The fields are the cell's ``TrainRecipe`` (kdbench/cells.py) plus ``seed`` (teachers only).
    """

    model_config = ConfigDict(extra="forbid", frozen=False)
    #: teacher_train only: a fixed teacher seed, or "per_cell" (default: 0)
    seed: int | Literal["per_cell"] | None = None


#: RepDistiller CIFAR-100: SGD 0.9, lr 0.05, x0.1 at 150/180/210 of 240, wd 5e-4, batch 64
_REPDISTILLER: dict[str, Any] = {
    "epochs": 240,
    "batch_size": 64,
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": [150, 180, 210],
    "gamma": 0.1,
    "augment": "flip_crop",
}

#: protocol presets; fields a grid sets explicitly win over the preset
PRESETS: dict[str, dict[str, Any]] = {
    "repdistiller": _REPDISTILLER,
    # mdistiller's CIFAR-100 recipe is RepDistiller's schedule and batch size
    "mdistiller": dict(_REPDISTILLER),
    "quick": {"epochs": 3, "batch_size": 128, "lr": 0.05, "schedule": "cosine"},
}


#: Method defaults of a protocol preset, per (teacher, student) pair: what the authors ran.
#: {preset: {method: [(pairs or None for every pair, {param: value, "loss_weights": {term: w}})]}};
#: the first matching row wins. Applied by ``grid.expand`` to cells whose ``train.preset`` is
#: the key, only to values the grid did not set itself; ``kdbench run --dry-run`` shows them.
PAIR_DEFAULTS: dict[str, dict[str, list[tuple[frozenset[tuple[str, str]] | None, dict[str, Any]]]]] = {
    "mdistiller": {
        # megvii-research/mdistiller configs/cifar100/dkd/*.yaml (DKD.BETA; 8 in the others)
        "dkd": [
            (frozenset({("resnet56", "resnet20"), ("resnet110", "resnet32")}), {"beta": 2.0}),
            (
                frozenset(
                    {
                        ("vgg13", "vgg8"),
                        ("vgg13", "mobilenetv2"),
                        ("wrn_40_2", "wrn_16_2"),
                        ("wrn_40_2", "wrn_40_1"),
                    }
                ),
                {"beta": 6.0},
            ),
            (None, {"beta": 8.0}),
        ],
        # mdistiller configs/cifar100/reviewkd.yaml: REVIEWKD.REVIEWKD_WEIGHT 5.0
        "reviewkd": [(None, {"loss_weights": {"reviewkd": 5.0}})],
        # hunto/DIST_KD: the DIST term has loss weight 2 in every CIFAR-100 and ImageNet config
        "dist": [(None, {"loss_weights": {"dist": 2.0}})],
        # shicaiwei123/SDD-CVPR2024 README / train scripts: M = [1, 2] for these pairs, [1, 2, 4] else
        "sdd": [(frozenset({("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")}), {"scales": [1, 2]})],
    },
}


def pair_defaults(preset: str | None, method: str, teacher: str, student: str) -> dict[str, Any]:
    """The preset's reference values of ``method`` for a (teacher, student) pair (may be {})."""
    for pairs, values in PAIR_DEFAULTS.get(preset or "", {}).get(method, []):
        if pairs is None or (teacher, student) in pairs:
            return values
    return {}


class EvalConfig(EvalSpec):
    """``eval``: the cell's ``EvalSpec`` (kdbench/cells.py)."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class ExecutorConfig(BaseModel):
    """Where cells run: ``kind`` names a ``kdbench.executors`` plugin; every other key except
    ``threads`` is a parameter of that plugin, checked against its signature."""

    model_config = ConfigDict(extra="allow")
    kind: str = "local"
    #: intra-op CPU threads of every cell, inline or in a worker: fixed, so a cell's numbers do
    #: not depend on how it was scheduled (workers x threads must fit the CPUs; see runner)
    threads: int = Field(1, ge=1)
    #: run the cells that feed one teacher the same batches side by side in one process, the
    #: teacher's forward computed once per batch (kdbench/engine/lockstep.py); same numbers
    share_teacher: bool = True
    #: wall time one attempt of a cell may take (seconds, or "90s", "30m", "2h", "1:30:00");
    #: past it the cell checkpoints at its next step and fails as retryable (under any executor)
    time_limit: float | None = None

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)


_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(v: Any) -> float:
    """Seconds in ``v``: a number (seconds), "90s", "30m", "1h30m", "2h", "1:30:00" or "30:00"."""
    if isinstance(v, bool):
        raise ValueError(f"expected a duration, got {v!r}")
    if isinstance(v, int | float):
        secs = float(v)
    else:
        text = str(v).strip().lower()
        if ":" in text:
            parts = text.split(":")
            if len(parts) > 3 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"{v!r} is not a duration like 1:30:00")
            secs = float(sum(int(p) * 60**i for i, p in enumerate(reversed(parts))))
        else:
            found = re.fullmatch(r"(?:\s*\d+(?:\.\d+)?\s*(?:sec|min|s|m|h|d)?)+", text)
            pieces = re.findall(r"(\d+(?:\.\d+)?)\s*(sec|min|s|m|h|d)?", text)
            if not found or not pieces:
                raise ValueError(f"{v!r} is not a duration: write seconds or e.g. 90s, 30m, 2h, 1h30m")
            secs = sum(float(n) * _UNITS[u or "s"] for n, u in pieces)
    if not secs > 0:
        raise ValueError(f"a duration must be positive, got {v!r}")
    return secs


class PairConfig(_Strict):
    teacher: Any
    student: Any
    #: how the teacher is obtained: a ``kdbench.teachers`` plugin ("recipe" trains it)
    source: Any = "recipe"
    #: the teacher's own training data (a dataset reference, e.g. the balanced variant of a
    #: spurious set); default: the cell's dataset. Same classes, channels and image size.
    teacher_dataset: Any = None
    #: this pair's teacher recipe: keys merged over the grid's ``teacher_train`` (e.g. a tolerant
    #: teacher next to a normal one: ``teacher_train: {method: {tolerant: {eta: 0.6}}}``)
    teacher_train: dict[str, Any] | None = None


class ReferenceValue(_Strict):
    """A published number to compare with (presentation only: not part of any cell id)."""

    value: float
    source: str | None = None
    metric: str = "top1"
    #: the paper's selection rule for this number (reports mark a mismatch with --select)
    select: Literal["last", "best_val", "best_test"] | None = None


class GridConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output: str = "runs"
    datasets: list[Any] = Field(min_length=1)
    pairs: list[PairConfig] = Field(min_length=1)
    methods: list[Any] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher_train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    #: method label -> {"teacher->student" or column label: number | ReferenceValue, "source": text};
    #: `kdbench report` adds a "paper" column (see kdbench/reports/leaderboard.py)
    reference: dict[str, dict[str, float | ReferenceValue | str]] = Field(default_factory=dict)
    #: where cells report their training (``kdbench.loggers`` plugins: ``[tensorboard, {wandb:
    #: {project: p}}, {mlflow: {tracking_uri: u}}]``); unset: TensorBoard when installed. Not part
    #: of any cell id (presentation, like ``executor``)
    loggers: list[Any] | None = None

    def recipes(self) -> dict[str, TrainConfig]:
        """The student recipe and the teacher recipe, by their keys."""
        return {"train": self.train, "teacher_train": self.teacher_train}


# --------------------------------------------------------------------------- YAML with lines


class _Located(yaml.SafeLoader):
    """A SafeLoader that keeps the node tree so key paths map back to lines, and refuses a key
    written twice in one mapping (YAML would silently keep the last; ``<<`` merges may override)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._checked: set[int] = set()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode) and id(node) not in self._checked:
            self._checked.add(id(node))  # before merges are flattened into it
            seen: dict[str, yaml.Node] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"the key {key.value!r} is written twice in one mapping (first on line "
                        f"{seen[key.value].start_mark.line + 1}); keep one",
                        problem_mark=key.start_mark,
                    )
                seen[key.value] = key
        return super().construct_mapping(node, deep)


def _node_at(root: yaml.Node | None, path: tuple[Any, ...]) -> yaml.Node | None:
    """The YAML node a key path points at (the key itself for mappings), or its deepest parent."""
    node, found = root, root
    for part in path:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    found, nxt = k, v
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            found = nxt = node.value[part]
        if nxt is None:
            return found
        node = nxt
    return found


def _fmt_path(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


class Problems:
    """Collects every problem with its location; raises them all at once.

    A problem under a key set from the command line (``--set KEY=VALUE``, see
    :func:`apply_overrides`) names that override instead of a line of the file.
    """

    def __init__(self, file: str, root: yaml.Node | None, overrides: Sequence[Override] = ()):
        self.file = file
        self.root = root
        self.overrides = list(overrides)
        self.items: list[str] = []

    def _override(self, path: tuple[Any, ...]) -> Override | None:
        """The last override whose key covers ``path`` (or lies under it)."""
        for ov in reversed(self.overrides):
            n = min(len(ov.path), len(path))
            if ov.path[:n] == path[:n]:
                return ov
        return None

    def add(self, path: tuple[Any, ...], msg: str) -> None:
        ov = self._override(path)
        if ov is not None:
            where = "" if path == ov.path else f"{_fmt_path(path)}: "
            self.items.append(f"--set {ov.text}: {where}{msg}")
            return
        node = _node_at(self.root, path)
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.items.append(f"{self.file}{line}: {_fmt_path(path)}: {msg}")

    def raise_if_any(self) -> None:
        if self.items:
            n = len(self.items)
            sets = " with " + " ".join(f"--set {o.text}" for o in self.overrides) if self.overrides else ""
            head = f"{n} problem{'s' if n > 1 else ''} in {self.file}{sets}:"
            raise ConfigError(head + "\n  " + "\n  ".join(self.items), self.items)


class Override(NamedTuple):
    """One ``--set KEY=VALUE`` from the command line: the dotted key split, the YAML value parsed."""

    text: str
    path: tuple[str | int, ...]
    value: Any


def parse_override(text: str) -> Override:
    """``train.epochs=2`` -> Override(path=("train", "epochs"), value=2); ``methods.1=...`` indexes a list."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or any(not p.strip() for p in parts):
        raise ConfigError(
            f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set train.epochs=2 "
            "or --set 'methods=[kd, {dkd: {beta: 2}}]'"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {text}: the value is not YAML ({getattr(e, 'problem', e)}); quote it for the shell, "
            "e.g. --set 'seeds=[0, 1]'"
        ) from None
    path = tuple(int(p) if p.strip().isdigit() else p.strip() for p in parts)
    return Override(text, path, value)


def apply_overrides(data: Any, overrides: Sequence[Override], file: str) -> Any:
    """A copy of the grid's ``data`` with each override set in turn (later ones win).

    Missing mappings on the way are created; a list is indexed by a number within it; anything
    else on the way (a scalar, a list without that index) is an error naming the override.
    """
    import copy

    data = copy.deepcopy(data) if data is not None else {}
    for ov in overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"--set {ov.text}: {file} is not a mapping of keys, so there is nothing to set")
        node: Any = data
        for i, part in enumerate(ov.path):
            last = i == len(ov.path) - 1
            here = _fmt_path(ov.path[:i]) if i else "the grid"
            if isinstance(node, dict):
                key = str(part)
                if last:
                    node[key] = ov.value
                elif isinstance(node.get(key), dict | list):
                    node = node[key]
                elif node.get(key) is None:
                    node[key] = {}
                    node = node[key]
                else:
                    raise ConfigError(
                        f"--set {ov.text}: {_fmt_path(ov.path[: i + 1])} is {node[key]!r}, not a mapping; "
                        f"set it whole (--set {_fmt_path(ov.path[: i + 1])}=...)"
                    )
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                if last:
                    node[part] = ov.value
                else:
                    node = node[part]
            else:
                what = f"a list of {len(node)}" if isinstance(node, list) else repr(node)
                raise ConfigError(f"--set {ov.text}: {here} is {what}; it has no entry {part!r}")
    return data


def _model_at(model: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the value at ``loc`` under ``model`` (None: not a model)."""
    import typing

    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        model = field.annotation
        # Optional[...] / X | None / list[X] / dict[str, X]: look inside for the model
        while typing.get_origin(model) is not None:
            args = [a for a in typing.get_args(model) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            model = models[0] if models else (args[-1] if args else None)
            if model is None:
                return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _pydantic_msg(err: dict, model: Any = None) -> str:
    t = err["type"]
    if t == "extra_forbidden":
        key = err["loc"][-1] if err["loc"] else ""
        parent = _model_at(model, tuple(err["loc"][:-1])) if model is not None else None
        if parent is None:
            return f"unknown key {key!r}"
        known = [n for n, f in parent.model_fields.items() if not n.startswith("_")]
        known += [f.alias for f in parent.model_fields.values() if f.alias]
        return f"unknown key {key!r}" + registry.did_you_mean(str(key), known)
    if t == "missing":
        return "required key is missing"
    got = err.get("input")
    return f"{err['msg'].lower()}, got {got!r}" if not isinstance(got, dict | list) else err["msg"].lower()


# --------------------------------------------------------------------------- plugin references


class PluginRef(BaseModel):
    """A resolved ``name`` or ``{name: {params}}`` reference to a plugin."""

    kind: str
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    #: the parameter names the grid set explicitly (the rest are the plugin's defaults)
    given: list[str] = Field(default_factory=list)
    #: methods: the engine's loss-term weights (``loss_weights:``, or ``weights:`` for a method
    #: without a ``weights`` parameter of its own); not part of ``params``
    loss_weights: dict[str, Any] = Field(default_factory=dict)
    #: methods: the ``train`` fields this method's cells override (``train:`` in its row)
    train: dict[str, Any] = Field(default_factory=dict)
    #: methods: the resolved augmenter key when ``train`` overrides ``augment``
    train_augment: dict[str, Any] | None = None
    #: methods: the resolved views (view name → augmenter) when ``train`` overrides ``views``
    train_views: dict[str, PluginRef] | None = None

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params}

    @property
    def method_params(self) -> dict[str, Any]:
        """A method's constructor arguments as they enter the cell.

        A method's own ``weights`` parameter (ckakd) is included only when the grid sets it, and
        the parameters a method added after its first release (its class's ``added_params``,
        e.g. kd's ``standardize`` and ``base_T``) only when the grid sets one of them, so cells of
        grids that leave them at their defaults keep their format-1 ids.
        """
        added = set(getattr(registry.load("losses", self.name), "added_params", ()))
        uses_added = not added.isdisjoint(self.given)
        return {
            k: v
            for k, v in self.params.items()
            if k in self.given or (k != "weights" and (k not in added or uses_added))
        }


def parse_ref(raw: Any, kind: str, path: tuple, problems: Problems) -> PluginRef | None:
    """``"kd"``, ``{"dkd": {"beta": 6}}``, or for models ``"torchvision:resnet18"`` / ``"hf:/dir"``."""
    if isinstance(raw, str):
        name, params = raw, {}
    elif isinstance(raw, dict) and len(raw) == 1:
        name, params = next(iter(raw.items()))
        params = params if params is not None else {}
        if not isinstance(params, dict):
            problems.add(path + (name,), f"expected a mapping of parameters, got {params!r}")
            return None
        path = path + (name,)
    else:
        problems.add(path, f"expected a {registry.singular(kind)} name or {{name: {{params}}}}, got {raw!r}")
        return None
    if kind == "models" and ":" in str(name):
        source, _, arg = str(name).partition(":")
        argname = {"torchvision": "name", "timm": "name", "hf": "path"}.get(source, "name")
        name, params = source, {argname: arg, **params}
    try:
        registry.info(kind, str(name))
    except KdbenchError as e:
        problems.add(path, str(e))
        return None
    return PluginRef(kind=kind, name=str(name), params=dict(params), given=sorted(params))


#: arguments the engine supplies itself; a grid may not set them
_ENGINE_ARGS = {"self", "ctx", "num_classes", "in_channels"}


def signature_model(obj: Callable, skip: set[str] = _ENGINE_ARGS) -> type[BaseModel] | None:
    """A pydantic model of a plugin's keyword parameters (None if it takes ``**kwargs``)."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    try:
        hints = get_type_hints(target)
    except Exception:
        hints = {}
    fields: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL,):
            continue
        if p.kind is p.VAR_KEYWORD:
            return None
        ann = hints.get(p.name, Any)
        fields[p.name] = (ann, ... if p.default is p.empty else p.default)
    return create_model(
        f"{getattr(obj, '__name__', 'plugin')}Params",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )


def validate_params(ref: PluginRef, path: tuple, problems: Problems, reserved: tuple[str, ...] = ()) -> None:
    """Check ``ref.params`` against the plugin's signature; fill in defaults."""
    try:
        obj = registry.load(ref.kind, ref.name)
    except KdbenchError as e:
        problems.add(path, str(e))
        return
    params = {k: v for k, v in ref.params.items() if k not in reserved}
    # a plugin taking **kwargs (torchvision, timm, hf) may check them itself: ``obj.check_params``
    check = getattr(obj, "check_params", None)
    if callable(check):
        try:
            check({**params, **{k: ref.params[k] for k in reserved if k in ref.params}})
        except KdbenchError as e:
            problems.add(path, str(e))
            return
    model = signature_model(obj)
    if model is None:
        return
    try:
        validated = model.model_validate(params)
    except ValidationError as e:
        for err in e.errors():
            problems.add(path + tuple(err["loc"]), _pydantic_msg(err, model))
        return
    resolved = validated.model_dump(mode="json")
    ref.params = {**resolved, **{k: ref.params[k] for k in reserved if k in ref.params}}


# --------------------------------------------------------------------------- loading


#: most nodes the aliases of a grid may produce once followed (a real grid repeats a recipe
#: a few times: tens of nodes); bounds "billion laughs" alias bombs before anything walks the
#: expanded data. The file's own nodes are not counted: a big file is only as big as its text.
MAX_ALIAS_NODES = 100_000


def _read_grid_text(path: Path) -> str:
    """The text of a grid file, or a ConfigError naming the file (and line) saying what is wrong."""
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give the grid YAML file inside it")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    nul = raw.find(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start : e.start + 1].hex()
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{bad} at offset {e.start}); "
            "a grid is a YAML text file saved as UTF-8"
        ) from None
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ConfigError(
            f"{path}:{line}: contains a NUL byte (offset {nul}); a grid is a YAML text file, "
            "not a binary file"
        )
    return text


class _AliasBomb(Exception):
    """Raised by :func:`_check_aliases` with the key path and line where the bound was passed."""

    def __init__(self, path: tuple[Any, ...], line: int | None):
        super().__init__(path, line)
        self.path, self.line = path, line


def _expanded_sizes(root: yaml.Node, limit: int) -> dict[int, int]:
    """Each node's size with every alias below it expanded (capped just past ``limit``)."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()
    order: list[tuple[yaml.Node, bool]] = [(root, False)]
    while order:  # post-order without recursion
        node, done = order.pop()
        if id(node) in sizes or (not done and id(node) in entered):
            continue  # sized, or an alias inside its own anchor (a cycle: sized as unbounded below)
        children = _children(node)
        if not done:
            entered.add(id(node))
            order.append((node, True))
            order.extend((c, False) for c in children if id(c) not in sizes)
            continue
        # a child not sized by now is an ancestor of this node: the expansion never ends
        sizes[id(node)] = min(limit + 1, 1 + sum(sizes.get(id(c), limit + 1) for c in children))
    return sizes


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    return []


def _check_aliases(root: yaml.Node, limit: int) -> None:
    """Raise :class:`_AliasBomb` where the nodes produced by following aliases pass ``limit``.

    PyYAML's composer returns the anchored node itself for an alias, so an alias is a node met a
    second time while walking the tree; what it produces is that node's expanded size.
    """
    sizes = _expanded_sizes(root, limit)
    seen: set[int] = set()
    produced = 0
    stack: list[tuple[yaml.Node, tuple[Any, ...], int | None]] = [(root, (), None)]
    while stack:
        node, path, line = stack.pop()
        if id(node) in seen:
            produced += sizes[id(node)]
            if produced > limit:
                raise _AliasBomb(path, line)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((c, path + (i,), line) for i, c in reversed(list(enumerate(node.value))))
        elif isinstance(node, yaml.MappingNode):
            for k, v in reversed(node.value):
                here = path + (k.value if isinstance(k, yaml.ScalarNode) else "?",)
                stack.append((v, here, k.start_mark.line + 1))
                stack.append((k, here, k.start_mark.line + 1))


def load_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse a YAML file, returning (data, node tree); every problem names the file and line.

    The file is parsed once (the data is constructed from the node tree). Anchors and aliases
    work, but a file whose aliases produce more than ``MAX_ALIAS_NODES`` nodes once followed is
    refused, naming the key where that happens; the size of the file itself is not limited.
    """
    path = Path(path)
    text = _read_grid_text(path)
    loader = _Located(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_aliases(root, MAX_ALIAS_NODES)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is None and isinstance(e, yaml.reader.ReaderError):
            line = text.count("\n", 0, e.position) + 1
            raise ConfigError(f"{path}:{line}: {e.reason} (character {e.character!r})") from None
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    except _AliasBomb as e:
        raise ConfigError(
            f"{path}: its anchors and aliases expand to more than {MAX_ALIAS_NODES:,} nodes "
            f"(an alias bomb?), passing the bound at {_fmt_path(e.path)}"
            + (f" (line {e.line})" if e.line else "")
            + "; a grid repeats a recipe a few times, not exponentially"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a grid") from None
    finally:
        loader.dispose()
    return data, root


#: keys a recipe accepts in one place but that have no effect in the other: rejected, not ignored
INERT_KEYS: dict[str, dict[str, str]] = {
    "train": {
        "seed": "the student's seeds are the grid's `seeds:` list; set teacher seeds in `teacher_train.seed`",
        "method": "the students' methods are the grid's `methods:`; `method` belongs to `teacher_train`",
    },
    "teacher_train": {
        "views": "teachers train with cross-entropy alone and read no extra views; set views in `train`",
        "init_lr": "teachers have no initialisation stage; `init_lr` belongs to `train`",
        "device": "the teacher trains on the cell's device; set `train.device`",
        "teacher_view": "`teacher_view` (what the teacher sees while distilling) belongs to `train`",
        "gpus_per_cell": "a teacher trains on one process before its cells; DDP is for `train`",
        "nodes": "a teacher trains on one process before its cells; DDP is for `train`",
        "sync_bn": "a teacher trains on one process before its cells; DDP is for `train`",
        "jtt": "JTT upsamples the students' training split; set it in `train` (or use the method jtt)",
        "teacher_outputs": "teachers train on labels; replaying a teacher's soft labels belongs to `train`",
    },
}


def _reject_inert(raw: dict, key: str, problems: Problems) -> None:
    for k, why in INERT_KEYS.get(key, {}).items():
        # `teacher_train.views: {}` says what is true (no views) and is part of existing teacher ids
        if k in raw and not (k == "views" and raw[k] == {}):
            problems.add((key, k), f"has no effect here: {why}")


def apply_preset(raw: dict | None, path: tuple, problems: Problems) -> dict:
    raw = dict(raw or {})
    preset = raw.get("preset")
    if preset is None:
        return raw
    if preset not in PRESETS:
        problems.add(path + ("preset",), f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return raw
    return {**PRESETS[preset], **raw}


class Grid(BaseModel):
    """A validated grid: the config plus resolved plugin references."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    file: str
    config: GridConfig
    datasets: list[PluginRef]
    pairs: list[tuple[PluginRef, PluginRef, PluginRef]]  # teacher model, student model, teacher source
    methods: list[PluginRef]
    train_augment: PluginRef
    teacher_augment: PluginRef
    views: dict[str, PluginRef]
    #: the ``train`` keys the grid set itself (presets only fill the others)
    train_given: list[str] = Field(default_factory=list)
    #: the executor plugin and its validated parameters (``executor:`` minus ``kind`` and ``threads``)
    executor: PluginRef | None = None
    #: the loggers and their validated parameters (None: the defaults, kdbench/loggers/base.py)
    loggers: list[PluginRef] | None = None
    #: per pair (aligned with ``pairs``): its own teacher recipe, or None for the grid's ``teacher_train``
    teacher_trains: list[TrainConfig | None] = Field(default_factory=list)
    #: per pair (aligned with ``pairs``): the teacher's own dataset, or None for the cell's
    teacher_datasets: list[PluginRef | None] = Field(default_factory=list)

    #: the ``--set KEY=VALUE`` overrides applied to the file, in order
    overrides: list[str] = Field(default_factory=list)
    #: the grid as resolved: the file's text, or with overrides the merged grid as YAML (what
    #: the run directory records as ``grid.yaml``)
    text: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output) / self.config.name

    def problems(self, root: yaml.Node | None) -> Problems:
        """A Problems locating keys in this grid's file, or naming the override that set them."""
        return Problems(self.file, root, [parse_override(o) for o in self.overrides])


def resolved_text(path: Path, sets: Sequence[Override], data: Any) -> str:
    """The file's text; with overrides, the merged grid as YAML under a header naming them."""
    if not sets:
        return _read_grid_text(path)
    head = f"# {path} as resolved with:\n" + "".join(f"#   --set {o.text}\n" for o in sets)
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _teacher_method(raw: Any, path: tuple, problems: Problems) -> dict[str, Any] | None:
    """A teacher recipe's ``method``: a teacher-free loss plugin, validated, as {name, params}."""
    ref = parse_ref(raw, "losses", path, problems)
    if ref is None:
        return None
    validate_params(ref, path, problems)
    try:
        cls = registry.load("losses", ref.name)
    except KdbenchError:
        return None
    if cls.needs_teacher(**ref.params):
        problems.add(path, f"{ref.name} needs a teacher; a teacher's recipe can only use a teacher-free loss")
        return None
    return {"name": ref.name, "params": ref.params}


def _pair_teacher_train(data: dict, override: dict, path: tuple, problems: Problems) -> TrainConfig | None:
    """A pair's teacher recipe: its keys over the grid's ``teacher_train`` (after presets)."""
    if not isinstance(override, dict):
        problems.add(path, f"expected a mapping of teacher_train keys, got {override!r}")
        return None
    _reject_inert(override, "teacher_train", problems)
    merged = {**(data.get("teacher_train") or {}), **override}
    merged = apply_preset(merged, path, problems)
    try:
        tc = TrainConfig.model_validate(merged)
    except ValidationError as e:
        for err in e.errors():
            problems.add(path + tuple(err["loc"]), _pydantic_msg(err, TrainConfig))
        return None
    if tc.method is not None:
        tc.method = _teacher_method(tc.method, path + ("method",), problems)
    return tc


def executor_ref(ex: ExecutorConfig, problems: Problems | None = None, kind: str | None = None) -> PluginRef:
    """The executor plugin reference of an ``executor:`` block (``kind`` overrides the grid's,
    keeping the grid's parameters only when the kinds agree), validated against its signature."""
    own = problems is None
    problems = problems or Problems("--executor", None)
    name = kind or ex.kind
    params = dict(ex.model_extra or {}) if name == ex.kind else {}
    ref = PluginRef(kind="executors", name=name, params=params, given=sorted(params))
    validate_params(ref, ("executor",), problems)
    if own:
        problems.raise_if_any()
    return ref


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> Grid:
    """Read, validate and resolve a grid file; raise ConfigError listing every problem.

    ``overrides`` are ``KEY=VALUE`` strings from the command line (``--set train.epochs=2``):
    applied to the file's data before validation, checked exactly like the file, and kept in
    :attr:`Grid.text` (the grid as resolved, which the run directory records).
    """
    path = Path(path)
    data, root = load_yaml(path)
    sets = [parse_override(o) for o in overrides]
    if sets:
        data = apply_overrides(data, sets, str(path))
    problems = Problems(str(path), root, sets)
    if not isinstance(data, dict):
        problems.add((), "a grid must be a mapping with keys name, datasets, pairs, methods, ...")
        problems.raise_if_any()
    data = dict(data)
    train_given = sorted(data["train"]) if isinstance(data.get("train"), dict) else []
    cfg = _validate_grid(data, problems)
    datasets = _refs(cfg.datasets, "datasets", ("datasets",), problems)
    methods = _refs(cfg.methods, "losses", ("methods",), problems)
    pairs, teacher_datasets, teacher_trains = _pairs(cfg, data, problems)
    augs = {key: _augmenter(tc.augment, (key, "augment"), problems) for key, tc in cfg.recipes().items()}
    views = {}
    for view, raw in cfg.train.views.items():
        v = _augmenter(raw, ("train", "views", view), problems)
        if v is not None:
            views[view] = v
    executor = executor_ref(cfg.executor, problems)
    loggers = None if cfg.loggers is None else _refs(cfg.loggers, "loggers", ("loggers",), problems)
    if cfg.teacher_train.method is not None:
        resolved = _teacher_method(cfg.teacher_train.method, ("teacher_train", "method"), problems)
        cfg.teacher_train.method = resolved
    if len(set(cfg.seeds)) != len(cfg.seeds):
        problems.add(("seeds",), "seeds repeat; list each seed once")
    problems.raise_if_any()
    return Grid(
        file=str(path),
        overrides=[o.text for o in sets],
        text=resolved_text(path, sets, data),
        config=cfg,
        datasets=datasets,
        pairs=pairs,
        methods=methods,
        train_augment=augs["train"],
        teacher_augment=augs["teacher_train"],
        executor=executor,
        loggers=loggers,
        teacher_trains=teacher_trains,
        views=views,
        train_given=train_given,
        teacher_datasets=teacher_datasets,
    )


def _validate_grid(data: dict, problems: Problems) -> GridConfig:
    """``data`` (recipes with their presets applied) as a GridConfig; raises with every problem
    found, plugin problems of the parts that parsed included, when it is not one."""
    for key in ("train", "teacher_train"):
        if key in data and not isinstance(data[key], dict):
            problems.add((key,), f"expected a mapping, got {data[key]!r}")
            data.pop(key)
        elif key in data:
            _reject_inert(data[key], key, problems)
            data[key] = apply_preset(data[key], (key,), problems)
    try:
        return GridConfig.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            problems.add(tuple(err["loc"]), _pydantic_msg(err, GridConfig))
    _check_plugins_only(data, problems)
    problems.raise_if_any()
    raise AssertionError("unreachable: a grid that failed validation has problems")


def _augmenter(raw: Any, where: tuple, problems: Problems) -> PluginRef | None:
    """An augmenter reference, its parameters checked (None: a problem was recorded)."""
    ref = parse_ref(raw, "augmenters", where, problems)
    if ref is not None:
        validate_params(ref, where, problems)
    return ref


def _pairs(
    cfg: GridConfig, data: dict, problems: Problems
) -> tuple[list[tuple[PluginRef, PluginRef, PluginRef]], list[PluginRef | None], list[TrainConfig | None]]:
    """Each valid pair's (teacher, student, source) references, its teacher's own dataset and
    its teacher recipe (None: the grid's)."""
    pairs, teacher_datasets, teacher_trains = [], [], []
    for i, pair in enumerate(cfg.pairs):
        t = parse_ref(pair.teacher, "models", ("pairs", i, "teacher"), problems)
        s = parse_ref(pair.student, "models", ("pairs", i, "student"), problems)
        src = parse_ref(pair.source, "teachers", ("pairs", i, "source"), problems)
        for ref, where in ((t, "teacher"), (s, "student"), (src, "source")):
            if ref is not None:
                validate_params(ref, ("pairs", i, where), problems, reserved=("taps",))
        tds = None
        if pair.teacher_dataset is not None:
            where = ("pairs", i, "teacher_dataset")
            tds = parse_ref(pair.teacher_dataset, "datasets", where, problems)
            if tds is not None:
                validate_params(tds, where, problems)
        pair_tt = None
        if pair.teacher_train is not None:
            pair_tt = _pair_teacher_train(data, pair.teacher_train, ("pairs", i, "teacher_train"), problems)
        if t and s and src:
            pairs.append((t, s, src))
            teacher_datasets.append(tds)
            teacher_trains.append(pair_tt)
    return pairs, teacher_datasets, teacher_trains


#: the key that sets a method's loss-term weights for the engine (``weights`` also works for a
#: method with no ``weights`` parameter of its own)
LOSS_WEIGHTS_KEY = "loss_weights"


def _split_loss_weights(ref: PluginRef, path: tuple, problems: Problems) -> None:
    """Move the engine's loss-term weights out of a method's parameters into ``ref.loss_weights``.

    ``loss_weights: {term: w}`` always means the engine's weights. ``weights: {term: w}`` means
    the same for a method without a ``weights`` parameter (backward compatible), and is the
    method's own parameter for one that has it (ckakd's per-group weights).
    """
    try:
        obj = registry.load("losses", ref.name)
        own = "weights" in inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
    except (KdbenchError, TypeError, ValueError):
        obj, own = None, False
    lw = ref.params.pop(LOSS_WEIGHTS_KEY, None)
    key = LOSS_WEIGHTS_KEY
    if not own and "weights" in ref.params:
        if lw is not None:
            problems.add(
                path + ("weights",), f"set the loss-term weights once: {LOSS_WEIGHTS_KEY} or weights"
            )
        lw, key = ref.params.pop("weights"), "weights"
    ref.given = [k for k in ref.given if k in ref.params]
    if lw is None:
        return
    if not (isinstance(lw, dict) and all(isinstance(v, int | float) for v in lw.values())):
        problems.add(path + (key,), f"expected a mapping of loss term -> number, got {lw!r}")
        return
    ref.loss_weights = dict(lw)
    known = {"ce", *getattr(obj, "default_weights", {})}
    for term in lw:
        if term not in known:
            problems.add(
                path + (key, term),
                f"{ref.name} has no loss term {term!r}; its terms: {', '.join(sorted(known))}",
            )


#: the key of a method row that overrides the grid's ``train`` fields for that method's cells
TRAIN_KEY = "train"
#: ``train`` fields a method row may not override (they are the grid's, not a cell's)
_GRID_ONLY_TRAIN = ("seed", "preset")


def _split_train(ref: PluginRef, path: tuple, problems: Problems) -> None:
    """Move a method row's ``train: {field: value}`` out of its parameters into ``ref.train``.

    ``- kd: {train: {sampler: group_balanced}}`` runs kd's cells with those ``train`` fields
    (any of the grid's ``train`` keys but seed and preset; ``augment`` may name an augmenter),
    as its own leaderboard row ``kd(train.sampler=group_balanced)``.
    """
    raw = ref.params.pop(TRAIN_KEY, None)
    ref.given = [k for k in ref.given if k in ref.params]
    if raw is None:
        return
    where = path + (TRAIN_KEY,)
    if not isinstance(raw, dict) or not raw:
        problems.add(
            where, f"expected a mapping of train fields, e.g. {{sampler: group_balanced}}, got {raw!r}"
        )
        return
    bad = [k for k in raw if k in _GRID_ONLY_TRAIN]
    for k in bad:
        problems.add(where + (k,), f"{k} is set for the whole grid (top-level train:), not per method")
    try:
        TrainConfig.model_validate({k: v for k, v in raw.items() if k not in bad})
    except ValidationError as e:
        for err in e.errors():
            problems.add(where + tuple(err["loc"]), _pydantic_msg(err, TrainConfig))
        return
    if "augment" in raw:
        a = parse_ref(raw["augment"], "augmenters", where + ("augment",), problems)
        if a is None:
            return
        validate_params(a, where + ("augment",), problems)
        ref.train_augment = a.key()
    if "views" in raw:
        views = {}
        for view, v_raw in (raw["views"] or {}).items():
            v = _augmenter(v_raw, where + ("views", view), problems)
            if v is None:
                return
            views[view] = v
        ref.train_views = views
    ref.train = {k: v for k, v in raw.items() if k not in bad}


def _refs(
    raws: list[Any], kind: str, path: tuple, problems: Problems, reserved: tuple[str, ...] = ()
) -> list[PluginRef]:
    out = []
    seen: set[str] = set()
    for i, raw in enumerate(raws):
        ref = parse_ref(raw, kind, path + (i,), problems)
        if ref is None:
            continue
        where = path + (i, ref.name) if isinstance(raw, dict) else path + (i,)
        if kind == "losses":
            _split_loss_weights(ref, where, problems)
            _split_train(ref, where, problems)
        validate_params(ref, where, problems, reserved=reserved)
        label = ref.name + (
            str(sorted(ref.params.items())) + str(ref.loss_weights) + str(sorted(ref.train.items()))
            if isinstance(raw, dict)
            else ""
        )
        if label in seen:
            problems.add(path + (i,), f"{ref.name!r} is listed twice with the same parameters")
        seen.add(label)
        out.append(ref)
    return out


def _check_plugins_only(data: dict, problems: Problems) -> None:
    for key, kind in (("datasets", "datasets"), ("methods", "losses"), ("loggers", "loggers")):
        raws = data.get(key)
        if isinstance(raws, list):
            _refs(raws, kind, (key,), problems)
    pairs = data.get("pairs")
    if isinstance(pairs, list):
        for i, p in enumerate(pairs):
            if isinstance(p, dict):
                for where in ("teacher", "student"):
                    if where in p:
                        parse_ref(p[where], "models", ("pairs", i, where), problems)
