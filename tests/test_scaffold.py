"""`kdbench new`: the generated packages install, are listed, and pass their own tests as generated;
bad requests are refused and leave nothing behind."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench import registry, scaffold
from kdbench.errors import ConfigError, KdbenchError, PluginError
from kdbench.scaffold import NAME_RULE, new_plugin, plugin_names, render
from tests.conftest import kdbench_cli

KINDS = list(scaffold.KINDS)
#: a fresh name per kind, none of them registered
NAMES = {"method": "scaffold_kd", "dataset": "scaffold_bands", "model": "scaffold_net"}


def with_site(site: Path) -> dict[str, str]:
    """The environment that sees the packages installed under ``site`` (and nothing else new)."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


def pip_install_target(pkg: Path, site: Path) -> None:
    """Install ``pkg`` into ``site`` only: never into the shared environment other tests see."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--target", str(site), str(pkg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr + r.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_generated_package_installs_is_listed_and_passes_its_own_tests(kind, tmp_path):
    name = NAMES[kind]
    made = kdbench_cli("new", kind, name, "--dir", str(tmp_path / "src"))  # the way a user starts
    assert made.returncode == 0, made.stderr
    pkg = tmp_path / "src" / plugin_names(kind, name).dist
    files = sorted(p for p in pkg.rglob("*") if p.is_file())
    assert sorted(Path(line) for line in made.stdout.splitlines()) == files
    site = tmp_path / "site"
    pip_install_target(pkg, site)

    plural = scaffold.KINDS[kind]
    listed = kdbench_cli("list", plural, "--json", env={"PYTHONPATH": with_site(site)["PYTHONPATH"]})
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows[name]["dist"] == pkg.name and rows[name]["version"] == "0.1.0"
    assert not rows[name]["conflict"]

    # the package's own tests, as generated, in a fresh interpreter from the package directory
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=pkg,
        env=with_site(site),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_generated_files(kind):
    n = plugin_names(kind, NAMES[kind])
    files = render(kind, n.name)
    expected = {"pyproject.toml", "README.md", f"{n.package}/__init__.py", f"tests/test_{n.name}.py"}
    assert set(files) == expected
    for rel, text in files.items():
        if rel.endswith(".py"):
            compile(text, rel, "exec")  # a syntax error would fail here, with the file's name
    group = registry.GROUPS[scaffold.KINDS[kind]]
    assert f'[project.entry-points."{group}"]\n{n.name} = "{n.package}:{n.obj}"' in files["pyproject.toml"]
    readme = files["README.md"]
    for step in ("pip install -e .", f"kdbench list {scaffold.KINDS[kind]}", "pytest", "What to edit"):
        assert step in readme, step
    module, test = files[f"{n.package}/__init__.py"], files[f"tests/test_{n.name}.py"]
    docstring = {"method": ("Paper:", "Formula:", "Reference:"), "dataset": ("Source:", "Reference:")}
    for field in docstring.get(kind, ("Paper:", "Reference:")):
        assert field in module, field
    assert "REPLACE" in module and "test_runs_in_a_tiny_grid" in test
    if kind == "method":
        assert "test_loss_on_a_hand_computed_case" in test


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="needs ruff (the [test] extra)")
def test_generated_code_is_ruff_clean(tmp_path):
    for kind in KINDS:
        new_plugin(kind, NAMES[kind], tmp_path / kind)
        new_plugin(kind, "x" * 40, tmp_path / kind)  # the longest name the rule allows
        new_plugin(kind, "tensor", tmp_path / kind)  # a name that takes a suffix
    for pkg in tmp_path.glob("*/*"):  # each under its own pyproject's rules
        for args in (["check", "--no-cache", "."], ["format", "--no-cache", "--check", "."]):
            r = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=pkg, capture_output=True, text=True)
            assert r.returncode == 0, f"{pkg.name}: ruff {args[0]}\n{r.stdout}{r.stderr}"


def test_leaves_only_the_package(tmp_path):
    files = new_plugin("method", "my_kd", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["kdbench-my-kd"]  # no temporary directory left
    assert files[0].parent == tmp_path / "kdbench-my-kd" and all(p.is_file() for p in files)


def test_refuses_an_existing_directory_and_keeps_it(tmp_path):
    existing = tmp_path / "kdbench-my-kd"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists") as e:
        new_plugin("method", "my_kd", tmp_path)
    assert e.value.exit_code == 2
    assert [p.name for p in existing.iterdir()] == ["notes.txt"] and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("My-KD", "did you mean 'my_kd'?"),
        ("1kd", ""),
        ("kd!", ""),
        ("", ""),
        ("k" * 41, ""),
        ("_kd", ""),
    ],
)
def test_refuses_a_bad_name_and_says_the_rule(name, hint, tmp_path):
    with pytest.raises(ConfigError) as e:
        new_plugin("method", name, tmp_path)
    assert NAME_RULE in str(e.value) and hint in str(e.value) and e.value.exit_code == 2
    assert not list(tmp_path.iterdir())


def test_refuses_a_python_keyword(tmp_path):
    with pytest.raises(ConfigError, match="keyword"):
        new_plugin("model", "lambda", tmp_path)


@pytest.mark.parametrize(("kind", "name"), [("method", "kd"), ("model", "resnet8"), ("dataset", "digits")])
def test_refuses_a_name_a_builtin_has(kind, name, tmp_path):
    with pytest.raises(PluginError) as e:
        new_plugin(kind, name, tmp_path)
    msg = str(e.value)
    assert f"{kind} {name!r} is already registered by kdbench" in msg, msg
    assert f"did you mean 'my_{name}'" in msg and f"kdbench list {scaffold.KINDS[kind]}" in msg
    assert e.value.exit_code == 2 and not list(tmp_path.iterdir())


def test_the_command_line_refuses_without_a_traceback(tmp_path):
    r = kdbench_cli("new", "method", "kd", "--dir", str(tmp_path))
    assert r.returncode == 2 and "did you mean 'my_kd'" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'method'"):
        new_plugin("methods", "my_kd", tmp_path)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the second file: the first is already on disk
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(scaffold.os, "fsync", failing_fsync)
    with pytest.raises(KdbenchError, match="No space left on device") as e:
        new_plugin("dataset", "my_data", tmp_path)
    assert e.value.exit_code == 2 and not list(tmp_path.iterdir())


def module_names(code: str) -> list[str]:
    """Every name bound at a module's top level (imports, definitions, assignments)."""
    names = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return names


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "name", ["f", "path", "taps", "tensor", "tensor_dataset", "nn", "torch", "math", "run_grid", "tap_spec"]
)
def test_a_name_never_shadows_what_the_generated_code_imports(kind, name):
    n = plugin_names(kind, name)
    for rel, text in render(kind, name).items():
        if rel.endswith(".py"):
            bound = module_names(text)
            assert len(bound) == len(set(bound)), (rel, sorted(bound))
            assert n.obj in bound, rel
    assert plugin_names("method", "taps").cls == "TapsMethod"
    assert plugin_names("dataset", "tensor").cls == "TensorPlugin"  # TensorDataset is taken too
    assert plugin_names("model", "nn").obj == "nn_model"
