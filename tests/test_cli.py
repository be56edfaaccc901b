"""The command line a newcomer meets: usage errors, --version / -h, --set overrides, completion, -o."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from kdbench import cli
from kdbench.config import load_grid
from kdbench.errors import ConfigError
from kdbench.runner import plan
from tests.conftest import done_metrics, kdbench_cli, kdbench_main

call = kdbench_main


def commands() -> dict[str, object]:
    return typer.main.get_command(cli.app).commands  # type: ignore[attr-defined]


#: per subcommand: (its required arguments, a call with a bad value, what the message says)
WALK = {
    "run": (["grid.yaml"], ["run", "grid.yaml", "--workers", "0"], "--workers"),
    "report": (["runs/x"], ["report", "runs/x", "--format", "jsn"], "did you mean 'json'"),
    "list": ([], ["list", "losess"], "did you mean 'losses'"),
    "bench": ([], ["bench", "--threads", "two"], "--threads"),
    "status": (["runs/x"], ["status", "runs/no-such-run"], "not a run directory"),
    "cka": (["grid.yaml"], ["cka", "grid.yaml", "--pair", "-1"], "--pair"),
    "rank-students": (["grid.yaml"], ["rank-students", "grid.yaml", "--probe", "1"], "--probe"),
    "plot": (["runs/x"], ["plot", "runs/no-such-run"], "no results store"),
    "new": (["method", "x"], ["new", "methd", "mine"], "did you mean 'method'"),
    "softlabels": (["grid.yaml"], ["softlabels", "no-such-grid.yaml"], "file not found"),
}


def test_the_walk_covers_every_subcommand():
    assert set(commands()) == set(WALK), "add the new subcommand to WALK"


@pytest.mark.parametrize("name", sorted(WALK))
def test_usage_mistakes_print_usage_and_exit_2_never_a_traceback(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    required, bad, says = WALK[name]
    if required:  # a missing argument: the usage line and the problem
        code, text = call(capsys, name)
        assert code == 2, text
        assert f"Usage: kdbench {name}" in text and "Missing argument" in text
        assert "Traceback" not in text
    code, text = call(capsys, name, *required, "--no-such-option")  # an unknown option
    assert code == 2 and "No such option: --no-such-option" in text and "Traceback" not in text
    assert f"Usage: kdbench {name}" in text
    code, text = call(capsys, *bad)  # a bad value: says which, exits 2
    assert code == 2, text
    assert says in text and "Traceback" not in text


def test_unknown_subcommand_suggests_the_close_one(capsys):
    code, text = call(capsys, "rn", "grid.yaml")
    assert code == 2 and "No such command 'rn'" in text and "Did you mean 'run'" in text
    assert "Traceback" not in text


def test_help_short_and_long_everywhere(capsys):
    for args in ([], *([c] for c in commands())):
        for flag in ("-h", "--help"):
            code, text = call(capsys, *args, flag)
            assert code == 0 and "Usage" in text, (args, flag)


def test_version_names_kdbench_torch_cuda_and_kernels(capsys):
    import torch

    import kdbench

    for flag in ("--version", "-V"):
        code, text = call(capsys, flag)
        assert code == 0
        assert f"kdbench {kdbench.__version__}" in text
        assert f"torch {torch.__version__}" in text and "CUDA" in text
        assert re.search(r"kernels: (native|reference)", text)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cli.__file__[:-7])
    if sha.returncode == 0:  # installed from this checkout: the commit is named
        assert f"git {sha.stdout.strip()[:12]}" in text


def test_an_internal_error_prints_one_line_and_logs_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KDBENCH_DEBUG", raising=False)

    def broken(*a, **k):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr("kdbench.report.report", broken)
    code, text = call(capsys, "report", str(tmp_path))
    assert code == 1
    assert "Traceback" not in text and "second line" not in text
    assert "internal error: RuntimeError: something inside broke" in text
    log = Path(re.search(r"traceback in (\S+?);", text.replace("\n", "")).group(1))
    assert log.parent == tmp_path / "cache" / "logs"
    body = log.read_text()
    assert "Traceback" in body and "something inside broke" in body and "kdbench report" in body


# --- --set -------------------------------------------------------------------------------


def test_set_names_the_override_in_each_problem(tiny_grid, capsys):
    grid = tiny_grid()
    code, text = call(capsys, "run", str(grid), "--set", "train.epoch=2", "--dry-run")
    assert code == 2 and "Traceback" not in text
    assert "--set train.epoch=2: unknown key 'epoch' (did you mean 'epochs'" in text
    for sets, says in (
        (["seeds=[0, 0]"], "--set seeds=[0, 0]: seeds repeat"),
        (
            ["methods=[kd, {dkd: {betta: 2}}]"],
            "methods[1].dkd.betta: unknown key 'betta' (did you mean 'beta'?)",
        ),
        (["train.epochs=two"], "--set train.epochs=two: input should be a valid integer"),
        (["name.x=1"], "--set name.x=1: name is 'tiny', not a mapping"),
        (["epochs"], "--set epochs: expected KEY=VALUE"),
        (["seeds=[0,"], "--set seeds=[0,: the value is not YAML"),
        (["methods.5=kd"], "--set methods.5=kd: methods is a list of 2; it has no entry 5"),
    ):
        with pytest.raises(ConfigError) as e:
            load_grid(grid, sets)
        assert says in str(e.value), str(e.value)


def test_set_edits_lists_by_index_and_later_overrides_win(tiny_grid):
    g = load_grid(
        tiny_grid(methods="[ce, kd]"), ["methods.1={kd: {T: 2}}", "train.epochs=3", "train.epochs=2"]
    )
    assert [(m.name, m.params.get("T")) for m in g.methods] == [("ce", None), ("kd", 2.0)]
    assert g.config.train.epochs == 2
    assert g.overrides == ["methods.1={kd: {T: 2}}", "train.epochs=3", "train.epochs=2"]


@pytest.mark.slow
def test_a_set_run_equals_the_grid_written_out_and_records_the_resolved_grid(tiny_grid, tmp_path):
    base = tiny_grid(methods="[ce]", seeds="[0]")
    full = tiny_grid(methods="[ce, {kd: {T: 2}}]", seeds="[0, 1]", name="full.yaml")
    sets = ["--set", "methods=[ce, {kd: {T: 2}}]", "--set", "seeds=[0, 1]"]
    r = kdbench_cli("run", str(base), "--out", str(tmp_path / "a"), *sets)
    assert r.returncode == 0, r.stderr
    assert "with --set methods=[ce, {kd: {T: 2}}] --set seeds=[0, 1]" in r.stderr
    r = kdbench_cli("run", str(full), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    a, b = done_metrics(tmp_path / "a"), done_metrics(tmp_path / "b")
    assert len(a) == 4 and a == b  # the same cell ids, the same numbers
    # the run directory records the grid as resolved, and it loads back to the same cells
    recorded = tmp_path / "a" / "grid.yaml"
    assert "--set seeds=[0, 1]" in recorded.read_text()
    again = plan(load_grid(recorded), tmp_path / "a")
    assert {c.id for c in again.cells} == set(a)
    # a rerun without the overrides says that its cells are not the finished ones
    r = kdbench_cli("run", str(base), "--out", str(tmp_path / "a"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("to run") == 0 and r.stdout.count("done") >= 1  # ce seed 0 is shared
    r = kdbench_cli("run", str(base), "--out", str(tmp_path / "a"), "--set", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    assert re.search(r"run again under new ids: their [^\n]*epochs[^\n]* changed", r.stderr), r.stderr


# --- completion and report files -----------------------------------------------------------


def complete(words: str, cwd: Path | None = None) -> list[str]:
    """What bash completion offers for the command line ``words`` (the last word being completed)."""
    parts = words.split(" ")
    env = {
        **os.environ,
        "_KDBENCH_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(parts) - 1),
    }
    r = subprocess.run(
        [sys.executable, "-m", "kdbench.cli"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_completion_of_subcommands_plugins_and_run_dirs(tmp_path):
    assert complete("kdbench ru") == ["run"]
    assert complete("kdbench run g.yaml --executor ") == ["local", "ray", "submitit"]
    assert {"dist", "dkd"} <= set(complete("kdbench report r --baseline d"))
    assert complete("kdbench report r --format j") == ["json"]
    assert complete("kdbench list los") == ["losses"]
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    (tmp_path / "runs" / "quick" / "results.sqlite").write_bytes(b"")
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "grid.yaml").write_text("name: g\n")
    assert complete("kdbench report ru", cwd=tmp_path) == ["runs/"]
    assert complete("kdbench report runs/", cwd=tmp_path) == ["runs/empty/", "runs/quick"]
    assert complete("kdbench run g", cwd=tmp_path) == ["grid.yaml"]
    for shell in ("bash", "zsh"):
        # the shell is named (typer otherwise detects the one it runs under, which may be sh)
        r = kdbench_cli("--show-completion", shell, env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
        assert r.returncode == 0 and "_KDBENCH_COMPLETE" in r.stdout, r.stderr


def test_completion_imports_no_torch():
    code = "import sys, kdbench.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", "kdbench.cli imports torch at start-up: completion gets slow"


def test_every_report_format_to_a_file(capsys, tmp_path, monkeypatch):
    from kdbench.report_choices import FORMATS

    monkeypatch.setattr("kdbench.report.report", lambda run_dir, fmt, *a, **k: f"table as {fmt}")
    for fmt in FORMATS:
        target = tmp_path / f"board.{fmt}"
        code, text = call(capsys, "report", str(tmp_path), "--format", fmt, "-o", str(target))
        assert code == 0, text
        assert target.read_text() == f"table as {fmt}\n"
        assert "table as" not in text  # written, not printed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"board.{f}" for f in FORMATS)  # no temp left
    code, text = call(capsys, "report", str(tmp_path), "-o", str(tmp_path / "board.csv" / "f"))
    assert code == 2 and "cannot write" in text and "Traceback" not in text


def test_list_names_each_methods_paper_from_source_without_importing_it():
    code = (
        "import sys, json; from kdbench import registry; "
        "rows = {n: registry.paper(i.value) for n, i in registry.scan()['losses'].items()}; "
        "print(json.dumps(rows)); print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rows_text, torch_loaded = r.stdout.strip().splitlines()
    rows = json.loads(rows_text)
    assert torch_loaded == "False"  # read from the source files, nothing imported
    assert rows["dist"] == "Huang et al., NeurIPS 2022"
    assert rows["dkd"] == "Zhao et al., CVPR 2022"
    assert rows["ce"] is None  # no citation: shown as "-"
    r = kdbench_cli("list", "losses", "--json")
    assert r.returncode == 0, r.stderr
    listed = {row["name"]: row["paper"] for row in json.loads(r.stdout)}
    assert listed["kd"].startswith("Hinton") and listed["kd"].endswith("2015")
