"""Shared fixtures: tiny grids on real offline data, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_grid(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def kdbench_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the installed CLI in a fresh interpreter (as a user would)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kdbench.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kdbench_main(capsys, *args: str) -> tuple[int, str]:
    """``kdbench ARGS`` in this process through the real entry point: (exit code, stdout+stderr)."""
    from kdbench import cli

    old = sys.argv
    sys.argv = ["kdbench", *args]
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        sys.argv = old
    got = capsys.readouterr()
    code = e.value.code
    return (code if isinstance(code, int) else 0), got.out + got.err


def done_metrics(run_dir: Path) -> dict[str, dict]:
    """cell id -> its metrics without timings, from a run directory's result files (all done)."""
    out = {}
    for f in Path(run_dir).glob("cells/*/result.json"):
        r = json.loads(f.read_text())
        assert r["status"] == "done", r.get("error")
        out[f.parent.name] = {k: v for k, v in r["metrics"].items() if not k.endswith("_s")}
    return out


def store_row(i: int, method: str, seed: int, metrics: dict, dataset: str, teacher: bool | None = None):
    """A done cell as ``Store.cells()`` returns it, for reports built from fabricated runs
    (teacher "T" with id t0, student "S"; ``teacher`` defaults to every method but ce)."""
    return {
        "id": f"c{i}",
        "status": "done",
        "config": {
            "dataset": {"name": dataset},
            "teacher": {"label": "T", "id": "t0"},
            "student": {"label": "S"},
            "method": {"label": method, "name": method},
            "seed": seed,
            "uses_teacher": method != "ce" if teacher is None else teacher,
            "train": {"epochs": 1},
        },
        "metrics": metrics,
        "env": {"threads": 1},
        "error": None,
        "wall_s": 1.0,
        "attempts": 1,
    }


TINY_GRID = """
name: tiny
output: {out}
datasets:
  - {{digits: {{limit: 400}}}}
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: {methods}
seeds: {seeds}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
teacher_train: {{epochs: 2, batch_size: 64, lr: 0.05, schedule: cosine, views: {{}}}}
eval: {{batch_size: 500}}
"""


@pytest.fixture
def tiny_grid(tmp_path: Path):
    def make(methods: str = "[ce, kd]", seeds: str = "[0]", epochs: int = 1, name: str = "grid.yaml") -> Path:
        return write_grid(
            tmp_path / name,
            TINY_GRID.format(out=tmp_path / "runs", methods=methods, seeds=seeds, epochs=epochs),
        )

    return make


#: slow end-to-end tests that `make test` (and CI) keeps: one or two per guarantee the suite
#: exists to protect; `make test-all` runs every slow test
CI_SLOW = {
    "tests/test_e2e.py::test_run_then_rerun_skips_everything",
    "tests/test_e2e.py::test_sigkill_mid_sweep_then_resume_records_each_cell_once",
    "tests/test_e2e.py::test_resumed_cell_matches_uninterrupted",
    "tests/test_zoo_grid.py::test_every_method_on_two_pairs",
    "tests/test_engine_cells.py::test_run_cell_leaves_no_open_descriptor",
    "tests/test_engine_cells.py::test_val_split_and_per_epoch_evaluation",
    "tests/test_reliability_e2e.py::test_numbers_do_not_depend_on_scheduling_and_a_killed_pool_leaves_no_orphans",
    "tests/test_reliability_e2e.py::test_a_worker_that_dies_hard_fails_only_its_cell",
    "tests/test_reliability_e2e.py::test_two_real_drivers_on_one_run_directory",
    "tests/test_reliability_e2e.py::test_time_limit_checkpoints_and_retries_resume_to_the_same_numbers",
    "tests/test_executors.py::test_submitit_local_cluster_gives_the_inline_numbers",
    "tests/test_executors.py::test_ray_task_killed_mid_cell_is_retried_with_the_same_numbers",
    "tests/test_sigterm.py::test_sigterm_checkpoints_exits_143_and_resumes_to_the_same_numbers[2]",
    "tests/test_sharing.py::test_group_is_bit_identical_to_cells_run_alone",
    "tests/test_corruptions_e2e.py::test_corruption_eval_end_to_end",
    "tests/test_groups_reports.py::test_spurious_grid_end_to_end",
    "tests/test_config_aug_e2e.py::test_kd_with_config_runs_rounds_and_replaces_them",
    "tests/test_ddp.py::test_ddp_cell_completes_writes_once_and_matches_single_process",
    "tests/test_loggers.py::test_a_ddp_cell_logs_one_run_from_rank_0",
    "tests/test_group_objectives.py::test_groupdro_and_jtt_train_end_to_end_on_spurious",
    "tests/test_analysis.py::test_tolerant_teacher_recipe_is_its_own_teacher_and_less_confident",
    "tests/test_gpu_check.py::test_cpu_dry_run_passes_every_step",
    "tests/test_cli.py::test_a_set_run_equals_the_grid_written_out_and_records_the_resolved_grid",
    "tests/test_report_html.py::test_real_shrunk_example_runs_pass_the_browser_checks",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in CI_SLOW:
            item.add_marker(pytest.mark.ci)
