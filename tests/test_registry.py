"""Plugin discovery through real entry points (importlib.metadata), including a real
third-party package installed into a temporary target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench import registry
from kdbench.errors import PluginError
from tests.conftest import ROOT, kdbench_cli


@pytest.fixture(autouse=True)
def fresh_scan():
    registry.clear_cache()
    yield
    registry.clear_cache()


def fake_dist(site: Path, name: str, version: str, group: str, entries: dict[str, str]) -> None:
    """A minimal installed distribution (dist-info with METADATA and entry_points.txt)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def test_builtins_are_registered_through_entry_points():
    losses = registry.names("losses")
    for m in ("ce", "kd", "dkd", "fitnet"):
        assert m in losses
    info = registry.info("losses", "kd")
    assert info.dist == "kdbench" and info.value == "kdbench.methods.kd:KD"
    assert "mnist5k" in registry.names("datasets")
    assert "smallcnn_wide" in registry.names("models")


def test_listing_imports_nothing():
    code = (
        "import sys; from kdbench import registry; registry.scan(); "
        "print(any(m.startswith('kdbench.methods.') or m.startswith('torch') for m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_unknown_name_suggests():
    with pytest.raises(PluginError, match="did you mean 'fitnet'"):
        registry.info("losses", "fitnett")


def test_broken_plugin_is_reported_with_its_distribution(tmp_path, monkeypatch):
    fake_dist(tmp_path, "kdbench-broken", "1.2.3", "kdbench.losses", {"broken": "no_such_module_xyz:Loss"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    assert "broken" in registry.names("losses")
    with pytest.raises(PluginError) as e:
        registry.load("losses", "broken")
    assert "kdbench-broken 1.2.3" in str(e.value) and "no_such_module_xyz" in str(e.value)
    assert registry.load("losses", "kd").__name__ == "KD"  # the others still work


def test_two_plugins_claiming_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    fake_dist(tmp_path, "kdbench-one", "0.1", "kdbench.losses", {"twin": "a:A"})
    fake_dist(tmp_path, "kdbench-two", "0.2", "kdbench.losses", {"twin": "b:B"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    # the clash is scoped to its name: the others still resolve
    assert "twin" in registry.names("losses") and registry.info("losses", "kd").dist == "kdbench"
    assert [p.dist for p in registry.claimants("losses", "twin")] == ["kdbench-one", "kdbench-two"]
    with pytest.raises(PluginError) as e:
        registry.info("losses", "twin")
    assert "kdbench-one 0.1" in str(e.value) and "kdbench-two 0.2" in str(e.value)
    assert "loss plugin 'twin'" in str(e.value)


def test_messages_say_loss_not_losse():
    with pytest.raises(PluginError, match="unknown loss 'kdd'"):
        registry.info("losses", "kdd")


@pytest.fixture(scope="module")
def example_plugin_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "plugins" / "kdbench-logit-mse"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def test_example_plugin_appears_in_list(example_plugin_site):
    r = kdbench_cli("list", "losses", "--json", env={"PYTHONPATH": str(example_plugin_site)})
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["logit_mse"]["dist"] == "kdbench-logit-mse"
    assert rows["logit_mse"]["version"] == "0.2.0"
    assert rows["kd"]["dist"] == "kdbench"


def test_example_plugin_runs_in_a_grid(example_plugin_site, tiny_grid):
    grid = tiny_grid(methods="[{logit_mse: {center: true}}]")
    r = kdbench_cli("run", str(grid), env={"PYTHONPATH": str(example_plugin_site)})
    assert r.returncode == 0, r.stderr + r.stdout
    assert "logit_mse" in r.stdout


def test_list_unknown_kind_exit_2():
    r = kdbench_cli("list", "lossess")
    assert r.returncode == 2 and "did you mean 'losses'" in r.stderr
