"""``kdbench new``: the package a plugin author starts from.

:func:`new_plugin` writes ``<dest>/kdbench-<name>/`` (the distribution's name: ``my_kd`` gives
``kdbench-my-kd``, importable as ``kdbench_my_kd``), a pip-installable package holding one
method (``kdbench.losses``), dataset (``kdbench.datasets``) or model (``kdbench.models``):

* ``pyproject.toml`` with the entry point that registers the plugin under its name,
* ``kdbench_<name>/__init__.py``, the plugin: the contract's hooks and a docstring template
  (paper, formula, reference). As generated it works: the method is a temperature-scaled KL
  (marked as the placeholder to replace), the model a tiny CNN with its feature taps, the
  dataset a small synthetic in-memory one,
* ``tests/test_<name>.py``, which runs the plugin in a tiny grid (and, for a method, checks
  the loss on a hand-computed case and its gradient),
* ``README.md``: how to install it, see it, test it, and what to edit.

The package is built in a temporary directory next to its destination and renamed into
place, so a failure leaves nothing half-written. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import keyword
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

from kdbench import __version__, registry
from kdbench.errors import ConfigError, KdbenchError, PluginError

#: what ``kdbench new`` makes -> the registry's plugin kind (its entry-point group)
KINDS: dict[str, str] = {"method": "losses", "dataset": "datasets", "model": "models"}

NAME_RULE = (
    "a plugin name is lowercase letters, digits and underscores, starts with a letter "
    "and has at most 40 characters (e.g. my_kd)"
)
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")

#: module-level names of the generated module and test; the plugin's class or factory must not shadow them
_TAKEN: dict[str, set[str]] = {
    "method": {"F", "Tensor", "ClassVar", "Features", "Batch", "Distiller", "MethodContext", "Taps", "Path"},
    "dataset": {"Tensor", "ClassVar", "TensorDataset", "KDDataset", "DataError", "Path"},
    "model": {"nn", "Tensor", "TapSpec", "FeatureReader", "discover_taps", "Path", "torch", "pytest"}
    | {"json", "math", "subprocess", "sys", "registry", "run_grid", "check_cells", "annotations"},
}


@dataclass(frozen=True)
class PluginNames:
    """Every name a generated package uses, derived from the plugin's name."""

    kind: str  # method | dataset | model
    name: str  # the plugin's name in grids and in `kdbench list`
    dist: str  # the distribution (pip) name, also the package directory
    package: str  # the importable package
    cls: str  # the plugin's class
    obj: str  # what the entry point names: the class (method, dataset) or a factory function (model)

    @property
    def group(self) -> str:
        return registry.GROUPS[KINDS[self.kind]]

    @property
    def plural(self) -> str:
        return KINDS[self.kind]


def plugin_names(kind: str, name: str) -> PluginNames:
    """The distribution, package and object names of plugin ``name`` (not validated)."""
    taken = _TAKEN.get(kind, set())
    camel = "".join(part.capitalize() for part in name.split("_"))
    cls = next(c for c in (camel, camel + kind.capitalize(), camel + "Plugin") if c not in taken)
    obj = (name + "_model" if name in taken else name) if kind == "model" else cls
    return PluginNames(kind, name, f"kdbench-{name.replace('_', '-')}", f"kdbench_{name}", cls, obj)


def check_new(kind: str, name: str) -> PluginNames:
    """Validate kind and name for a new plugin: the name follows the rule, is no Python keyword
    and is not registered yet by any installed distribution."""
    if kind not in KINDS:
        raise ConfigError(
            f"cannot make a {kind!r}{registry.did_you_mean(kind, list(KINDS))}; "
            f"choose one of: {', '.join(KINDS)}"
        )
    if not _NAME.fullmatch(name or ""):
        hint = name.lower().replace("-", "_").replace(" ", "_") if name else ""
        suggest = f" (did you mean {hint!r}?)" if hint != name and _NAME.fullmatch(hint) else ""
        raise ConfigError(f"invalid plugin name {name!r}{suggest}: {NAME_RULE}")
    if keyword.iskeyword(name):
        raise ConfigError(f"invalid plugin name {name!r}: it is a Python keyword; {NAME_RULE}")
    plural = KINDS[kind]
    taken = registry.claimants(plural, name)
    if taken:
        who = " and ".join(f"{p.dist} {p.version} ({p.value})" for p in taken)
        free = [c for c in (f"my_{name}", f"{name}2", f"{name}_v2") if c not in registry.names(plural)]
        suggest = f" (did you mean {' or '.join(repr(c) for c in free[:2])}?)" if free else ""
        raise PluginError(
            f"{kind} {name!r} is already registered by {who}; a new plugin needs a name of its own"
            f"{suggest}; `kdbench list {plural}` shows the names taken"
        )
    return plugin_names(kind, name)


def render(kind: str, name: str) -> dict[str, str]:
    """The generated package's files, relative path -> text (nothing is checked or written)."""
    n = plugin_names(kind, name)
    subs = {
        "name": n.name,
        "dist": n.dist,
        "package": n.package,
        "cls": n.cls,
        "obj": n.obj,
        "kind": n.kind,
        "plural": n.plural,
        "group": n.group,
        "kdbench_version": __version__,
    }
    t = _TEMPLATES[kind]

    def fill(text: str, **more: str) -> str:
        return Template(text).substitute(subs, **more)

    sections = {"use": fill(t.readme_use), "tests": fill(t.readme_tests), "edit": fill(t.readme_edit)}
    return {
        "pyproject.toml": fill(_PYPROJECT),
        "README.md": fill(_README, **sections),
        f"{n.package}/__init__.py": fill(t.module),
        f"tests/test_{n.name}.py": fill(t.test + _RUN_GRID),
    }


def new_plugin(kind: str, name: str, dest: Path) -> list[Path]:
    """Write a pip-installable package for a new ``kind`` plugin (``method``, ``dataset`` or
    ``model``) called ``name`` into ``dest/kdbench-<name>/`` (underscores become hyphens) and
    return the files written, ``pyproject.toml`` first.

    Refuses (a :class:`~kdbench.errors.KdbenchError`, exit code 2) an unknown kind, a name
    that breaks :data:`NAME_RULE`, a name an installed plugin of that kind already has, and a
    destination that exists. All files appear at once or none does.
    """
    n = check_new(kind, name)
    target = Path(dest).expanduser() / n.dist
    if target.exists() or target.is_symlink():
        raise ConfigError(
            f"{target} already exists; choose another --dir or name, or delete it to start again"
        )
    files = render(kind, name)
    try:
        _write_tree(target, files)
    except OSError as e:
        raise KdbenchError(f"cannot write {target}: {e.strerror or e}") from None
    return [target / rel for rel in files]


def _write_tree(target: Path, files: dict[str, str]) -> None:
    """Write ``files`` into a fresh directory beside ``target``, then rename it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0o700
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        if target.exists():  # created meanwhile: rename would replace an empty directory
            raise ConfigError(f"{target} appeared while the package was written; nothing was changed")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):  # best effort: the package is in place either way
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------- templates
# string.Template: $name, $dist, $package, $cls, $obj, $kind, $plural, $group, $kdbench_version
# (and the README's $use, $tests, $edit: sections filled first).

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
# The version is part of every cell id that uses this plugin: bump it when its numbers change.
version = "0.1.0"
description = "A kdbench $kind: $name (say in one line what it is)."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["kdbench>=$kdbench_version"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The line that makes this a kdbench $kind: a `$group` entry point, name = "module:object".
[project.entry-points."$group"]
$name = "$package:$obj"

[tool.setuptools]
packages = ["$package"]

[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.ruff]
line-length = 110

[tool.ruff.lint]
select = ["E", "F", "W", "I", "UP", "B"]
"""

_README = """\
# $dist

A kdbench $kind, `$name`: <say in one line what it is, and cite the paper>.

## Install

In this directory, into the environment where kdbench is installed:

    pip install -e .

(Offline, add `--no-build-isolation`: setuptools is then taken from the environment.)

## See it

    kdbench list $plural        # lists $name, provided by $dist 0.1.0

## Use it

$use

## Test it

    pip install -e '.[test]'
    pytest -q

`tests/test_$name.py` $tests It takes about ten seconds on a CPU.

## What to edit

$edit
"""

_METHOD_USE = """\
In a grid, like any built-in method (its parameters are the ones of `$obj.__init__`):

    methods: [kd, $name, {$name: {T: 2.0}}]"""

_METHOD_TESTS = """\
checks the loss on a case computed by hand and its gradient, and runs
the method in a tiny grid."""

_METHOD_EDIT = """\
1. `$package/__init__.py`, the method. The loss it computes as generated is a placeholder,
   Hinton et al.'s temperature-scaled KL: replace `forward` with your method's loss terms, and
   set `taps` (the features it reads: `logits`, `stages`, `preact`, `pooled`, `blocks`), the
   parameters of `__init__` (the grid's `{$name: {param: value}}` is validated against them)
   and `default_weights`. Fill in the docstring: the paper, the formula, the reference code.
   Every other hook, with its default, is listed in `kdbench/methods/base.py`.
2. `tests/test_$name.py`: replace the hand-computed case with one for your formula (golden
   values from the reference implementation are best).
3. `pyproject.toml`: the description; bump the version whenever the numbers change."""

_DATASET_USE = """\
In a grid, like any built-in dataset (its parameters are the ones of `$obj.__init__`):

    datasets: [{$name: {n_train: 512, seed: 0}}]"""

_DATASET_TESTS = """\
checks the splits against the dataset contract, and runs the dataset
in a tiny grid."""

_DATASET_EDIT = """\
1. `$package/__init__.py`, the dataset. As generated it serves a small synthetic,
   in-memory dataset: replace `_generate` with code that reads your images and labels, and
   set `num_classes`, `in_channels`, `image_size`, `splits` and `needs_root` (True when the
   grid must give a `root:` directory). Keep `fingerprint` naming everything that changes the
   data: it is part of every cell id. Optional hooks (`meta`, `group_info`, `eval_splits`)
   are described in `kdbench/datasets/base.py`. Fill in the docstring: source and licence.
2. `tests/test_$name.py`: the shapes, sizes and parameters of your data.
3. `pyproject.toml`: the description; bump the version whenever the data changes."""

_MODEL_USE = """\
In a grid, as a teacher or a student (its parameters are the ones of `$obj()`):

    pairs:
      - teacher: {$name: {width: 16}}
        student: {$name: {width: 4}}"""

_MODEL_TESTS = """\
checks the logits and the feature taps, and runs the model as teacher
and student in a tiny grid."""

_MODEL_EDIT = """\
1. `$package/__init__.py`, the model. As generated it is a tiny CNN: replace its layers
   with your architecture and keep `kd_taps` pointing at the modules whose outputs are its
   stages (shallow to deep), whose inputs are their pre-activations, and at its final linear
   layer; methods such as FitNet read their features there. `$obj()` must accept
   `num_classes` and, to work on greyscale and colour data alike, `in_channels`. Fill in
   the docstring: the paper and the reference code.
2. `tests/test_$name.py`: the shapes of your model's features.
3. `pyproject.toml`: the description; bump the version whenever the architecture changes."""

# A grid run in a fresh interpreter: the end of the three generated tests.
_RUN_GRID = '''

def run_grid(tmp_path: Path, grid: str) -> list[dict]:
    """`kdbench run` on ``grid`` in a fresh interpreter, as a user would; every cell's result."""
    (tmp_path / "grid.yaml").write_text(grid)
    run_dir = tmp_path / "run"
    # one worker: the cells run inside `kdbench run` itself, no pool of worker processes to start
    cmd = [sys.executable, "-m", "kdbench.cli", "run", str(tmp_path / "grid.yaml"), "--out", str(run_dir)]
    r = subprocess.run(
        [*cmd, "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("cells/*/result.json"))]


def check_cells(results: list[dict], n: int, plugin: str) -> None:
    """``n`` cells, all done with finite metrics, each using this package's plugin."""
    assert len(results) == n
    for r in results:
        assert r["status"] == "done", r["error"]
        assert math.isfinite(r["metrics"]["nll"]) and 0 <= r["metrics"]["top1"] <= 100
        assert r["cell"]["plugins"][plugin] == "$dist==0.1.0"
'''

_METHOD = '''\
"""$obj: <one line: what the student learns from the teacher>.

Paper:     <Authors>, "<Title>", <Venue Year>. <arXiv or DOI link>
Formula:   T² · mean_b KL( softmax(z_t / T) ‖ softmax(z_s / T) )
           REPLACE: this placeholder is the KD loss of Hinton, Vinyals & Dean (2015)
Reference: <the reference implementation: repository and file>
Defaults:  T = 4 <where the defaults come from>

Generated by `kdbench new method $name`.
`taps` names the features the method reads, `__init__`'s parameters are its public
interface (a grid's `{name: {param: value}}` is validated against them), `forward` returns
its named, unweighted loss terms and `default_weights` weighs them. Every other hook, with
its default, is listed in `kdbench.methods.base`.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from kdbench.features import Features
from kdbench.methods.base import Batch, Distiller, MethodContext, Taps
from torch import Tensor


class $cls(Distiller):
    """<One line: what this method does.>"""

    # the features read from each model: "logits", "stages", "preact", "pooled", "blocks"
    taps: ClassVar[Taps] = Taps(student=("logits",), teacher=("logits",))
    # the weight of each term `forward` returns; "ce" weighs the student's cross-entropy
    default_weights: ClassVar[dict[str, float]] = {
        "ce": 0.1,
        "$name": 0.9,
    }

    def __init__(self, ctx: MethodContext, T: float = 4.0):
        super().__init__(ctx)
        # trainable parts (regressors, embeddings) are submodules built here, sized from
        # ctx.student_shapes / ctx.teacher_shapes; they are optimised with the student
        self.T = T

    def forward(self, s: Features, t: Features, batch: Batch) -> dict[str, Tensor]:
        """Named, unweighted loss terms; ``t`` is detached (the teacher runs under no_grad)."""
        # REPLACE: the placeholder loss, T² times the batch-mean KL(teacher ‖ student) at temperature T
        log_p_s = F.log_softmax(s.logits / self.T, dim=1)
        log_p_t = F.log_softmax(t.logits / self.T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return {"$name": kl * self.T**2}
'''

_METHOD_TEST = '''\
"""The method: its loss on a hand-computed case, its gradient, and a run in a tiny grid."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kdbench import registry
from kdbench.features import Features
from kdbench.methods.base import Batch, MethodContext

from $package import $obj


def loss(zs: torch.Tensor, zt: torch.Tensor, **params) -> torch.Tensor:
    """The method's loss term for student logits ``zs`` and teacher logits ``zt``."""
    n, c = zs.shape
    ctx = MethodContext(num_classes=c, num_train=n, epochs=1, batch_size=n)
    method = $obj(ctx, **params)
    batch = Batch(x=torch.zeros(n, 1, 1, 1), y=torch.zeros(n, dtype=torch.long), index=torch.arange(n))
    terms = method(Features(logits=zs), Features(logits=zt.detach()), batch)
    return terms["$name"]


def test_loss_on_a_hand_computed_case():
    # REPLACE with a case for your formula. At T = 2, row 0 gives the teacher (0.5, 0.5) and
    # the student (0.75, 0.25): KL = 0.5·ln(0.5/0.75) + 0.5·ln(0.5/0.25) = 0.5·ln(4/3), times
    # T² = 4. Row 1 agrees exactly: KL = 0. The batch mean is ln(4/3).
    zs = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]], dtype=torch.float64)
    zt = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    assert loss(zs, zt, T=2.0).item() == pytest.approx(math.log(4 / 3), rel=1e-12)
    assert loss(zt, zt, T=2.0).item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    zt = torch.randn(4, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda z: loss(z, zt, T=3.0), (zs,))


def test_registered_under_its_name():
    loaded = registry.load("losses", "$name")
    assert loaded is $obj


GRID = """\\
name: $name-smoke
datasets: [{digits: {limit: 200}}]
pairs:
  - teacher: {smallcnn: {width: 4}}
    student: {smallcnn: {width: 2}}
methods: [$name, {$name: {T: 2.0}}]
seeds: [0]
train: {epochs: 1, batch_size: 64, views: {}}
teacher_train: {epochs: 1, batch_size: 64, views: {}}
eval: {batch_size: 500}
"""


def test_runs_in_a_tiny_grid(tmp_path):
    check_cells(run_grid(tmp_path, GRID), n=2, plugin="losses:$name")
'''

_DATASET = '''\
"""$obj: <one line: what the images show and what the labels are>.

Source:    <where the data comes from: paper, URL, licence>
Splits:    train and test; <number of images and classes>; images [C, H, W], normalised
Reference: <a loader this follows, e.g. a torchvision dataset>

Generated by `kdbench new dataset $name`.
As generated it serves a small synthetic dataset held in memory: each class is a bright
horizontal band at its own height, in Gaussian noise. A grid builds the class with its
parameters (plus ``root`` when the grid gives one); ``split(name)`` returns a
``TensorDataset`` of (normalised float image [C, H, W], integer label). Augmentation is not
the dataset's job. Optional hooks (``meta``, ``group_info``, ``eval_splits``) are described
in ``kdbench.datasets.base``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from kdbench.datasets.base import KDDataset
from kdbench.errors import DataError
from torch import Tensor
from torch.utils.data import TensorDataset


class $cls(KDDataset):
    """<One line: the dataset.>"""

    num_classes: ClassVar[int] = 4
    in_channels: ClassVar[int] = 1
    image_size: ClassVar[int] = 8
    #: True when the grid must give a `root:` directory holding the data
    needs_root: ClassVar[bool] = False
    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    def __init__(
        self,
        root: str | None = None,
        n_train: int = 512,
        n_test: int = 256,
        noise: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(root)  # checks `root` when needs_root
        if min(n_train, n_test) < self.num_classes:
            # the message needs no dataset name: kdbench prefixes it with the grid's line
            raise DataError(
                f"n_train and n_test must be at least {self.num_classes} (one image per class), "
                f"got {n_train} and {n_test}"
            )
        if noise < 0:
            raise DataError(f"noise must be >= 0, got {noise}")
        self.n_train, self.n_test, self.noise, self.seed = n_train, n_test, noise, seed
        train_x, train_y = self._generate(n_train, seed)
        test_x, test_y = self._generate(n_test, seed + 1)
        # both splits normalised with the training split's per-channel statistics
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True)
        self._splits = {
            "train": TensorDataset((train_x - mean) / std, train_y),
            "test": TensorDataset((test_x - mean) / std, test_y),
        }

    def _generate(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` float images [n, C, H, W] and int64 labels [n]; the same for the same seed.

        REPLACE: read your images and labels here (from ``self.root`` when ``needs_root``).
        """
        g = torch.Generator().manual_seed(seed)
        y = torch.randperm(n, generator=g) % self.num_classes  # balanced classes, shuffled
        size = (n, self.in_channels, self.image_size, self.image_size)
        x = self.noise * torch.randn(size, generator=g)
        band = self.image_size // self.num_classes
        for c in range(self.num_classes):
            x[y == c, :, c * band : (c + 1) * band, :] += 1.0
        return x, y

    def split(self, name: str) -> TensorDataset:
        if name not in self._splits:
            raise DataError(f"no split {name!r}; the splits are {', '.join(self._splits)}")
        return self._splits[name]

    def fingerprint(self) -> dict:
        """Everything that changes the data: part of every cell id that uses it."""
        params = {"n_train": self.n_train, "n_test": self.n_test, "noise": self.noise, "seed": self.seed}
        return {**super().fingerprint(), "params": params}
'''

_DATASET_TEST = '''\
"""The dataset: its contract, its determinism, and a run in a tiny grid."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kdbench import registry
from kdbench.errors import DataError

from $package import $obj


def test_splits_follow_the_dataset_contract():
    ds = $obj(n_train=40, n_test=20)
    for split, n in (("train", 40), ("test", 20)):
        data = ds.split(split)
        assert len(data) == n
        x, y = data[0]
        assert x.dtype == torch.float32 and x.shape == (ds.in_channels, ds.image_size, ds.image_size)
        labels = data.tensors[1]
        assert labels.dtype == torch.long and set(labels.tolist()) == set(range(ds.num_classes))
    with pytest.raises(DataError, match="no split"):
        ds.split("val")


def test_same_parameters_same_data_and_fingerprint():
    a, b, other = ($obj(seed=seed) for seed in (1, 1, 2))
    assert torch.equal(a.split("train").tensors[0], b.split("train").tensors[0])
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()
    assert not torch.equal(a.split("train").tensors[0], other.split("train").tensors[0])


def test_bad_parameters_are_data_errors():
    with pytest.raises(DataError, match="n_train"):
        $obj(n_train=1)


def test_registered_under_its_name():
    loaded = registry.load("datasets", "$name")
    assert loaded is $obj


GRID = """\\
name: $name-smoke
datasets: [{$name: {n_train: 128, n_test: 64}}]
pairs:
  - teacher: {smallcnn: {width: 4}}
    student: {smallcnn: {width: 2}}
methods: [ce, kd]
seeds: [0]
train: {epochs: 1, batch_size: 64, views: {}}
teacher_train: {epochs: 1, batch_size: 64, views: {}}
eval: {batch_size: 500}
"""


def test_runs_in_a_tiny_grid(tmp_path):
    check_cells(run_grid(tmp_path, GRID), n=2, plugin="datasets:$name")
'''

_MODEL = '''\
"""$obj: <one line: the architecture>.

Paper:     <Authors>, "<Title>", <Venue Year>. <arXiv or DOI link>
Reference: <the reference implementation: repository and file>

Generated by `kdbench new model $name`.
As generated it is a tiny CNN classifier: a stem and two stages that each halve the
resolution, global average pooling and a linear classifier.
``kd_taps`` (a ``kdbench.features.TapSpec``) says where its features live, by module path:
the modules whose outputs are its stages (shallow to deep), those whose *inputs* are the
stages' pre-activations, and the final linear layer (whose input is the pooled feature).
Methods read them through forward hooks; the model's ``forward`` just returns logits.
"""

from __future__ import annotations

from kdbench.features import TapSpec
from torch import Tensor, nn


class $cls(nn.Module):
    """stem → stage1 → stage2 (each halving the resolution) → global average pool → linear."""

    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        # REPLACE: your architecture; keep `kd_taps` below pointing at its modules
        self.stem = self._conv_bn(in_channels, width, stride=1)
        self.stem_act = nn.ReLU()
        self.stage1 = self._conv_bn(width, 2 * width, stride=2)
        self.act1 = nn.ReLU()
        self.stage2 = self._conv_bn(2 * width, 4 * width, stride=2)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self.kd_taps = TapSpec(
            stages=("stem_act", "act1", "act2"),
            preact=("stem_act", "act1", "act2"),  # a ReLU's input is its stage's pre-activation
            classifier="fc",
        )

    @staticmethod
    def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
        """3×3 convolution and batch norm; the ReLU after it is a module of its own (a tap)."""
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_act(self.stem(x))
        x = self.act1(self.stage1(x))
        x = self.act2(self.stage2(x))
        return self.fc(self.pool(x).flatten(1))


def $obj(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 8,
) -> nn.Module:
    """The factory the `kdbench.models` entry point names. Its parameters are the model's
    parameters in a grid (``{name: {width: 16}}``); kdbench passes ``num_classes`` and
    ``in_channels`` from the dataset."""
    return $cls(num_classes, in_channels, width)
'''

_MODEL_TEST = '''\
"""The model: logits, feature taps, and a run as teacher and student in a tiny grid."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from kdbench import registry
from kdbench.features import FeatureReader, discover_taps

from $package import $obj


def test_logits_and_feature_taps():
    model = $obj(num_classes=5, in_channels=3, width=4)
    reader = FeatureReader(model, discover_taps(model), ["logits", "stages", "preact", "pooled"])
    f = reader.read(torch.randn(2, 3, 16, 16))
    assert f.logits.shape == (2, 5)
    assert [tuple(s.shape) for s in f.stages] == [(2, 4, 16, 16), (2, 8, 8, 8), (2, 16, 4, 4)]
    assert [tuple(p.shape) for p in f.preact] == [tuple(s.shape) for s in f.stages]
    assert f.pooled.shape == (2, 16)


def test_registered_under_its_name():
    loaded = registry.load("models", "$name")
    assert loaded is $obj


# FitNet reads the stages: the taps work in training, not only in the test above
GRID = """\\
name: $name-smoke
datasets: [{digits: {limit: 200}}]
pairs:
  - teacher: {$name: {width: 8}}
    student: {$name: {width: 4}}
methods: [kd, fitnet]
seeds: [0]
train: {epochs: 1, batch_size: 64, views: {}}
teacher_train: {epochs: 1, batch_size: 64, views: {}}
eval: {batch_size: 500}
"""


def test_runs_in_a_tiny_grid(tmp_path):
    check_cells(run_grid(tmp_path, GRID), n=2, plugin="models:$name")
'''


@dataclass(frozen=True)
class _KindTemplates:
    module: str
    test: str
    readme_use: str  # README sections
    readme_tests: str
    readme_edit: str


_TEMPLATES: dict[str, _KindTemplates] = {
    "method": _KindTemplates(_METHOD, _METHOD_TEST, _METHOD_USE, _METHOD_TESTS, _METHOD_EDIT),
    "dataset": _KindTemplates(_DATASET, _DATASET_TEST, _DATASET_USE, _DATASET_TESTS, _DATASET_EDIT),
    "model": _KindTemplates(_MODEL, _MODEL_TEST, _MODEL_USE, _MODEL_TESTS, _MODEL_EDIT),
}
