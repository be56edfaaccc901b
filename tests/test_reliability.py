"""Faults a user meets, done the way a user meets them (issue 16): bad grid files, a second
driver on one run directory, twin plugins, an unwritable output directory, CPU budgets, and
dataset fingerprints that see every byte. The slow end-to-end faults are in
``test_reliability_e2e.py``."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kdbench import registry
from kdbench.config import ConfigError, load_grid, load_yaml
from kdbench.procs import _cgroup_quota, cpu_budget
from kdbench.rundir import RunDirBusy, RunLock
from tests.conftest import ROOT, TINY_GRID, kdbench_cli

# --------------------------------------------------------------------------- plugin site


def _write_dist(src: Path, name: str, module: str, entries: dict[str, str], code: str) -> Path:
    d = src / name
    (d / module).mkdir(parents=True)
    (d / module / "__init__.py").write_text(textwrap.dedent(code))
    eps = "\n".join(f'{k} = "{v}"' for k, v in entries.items())
    (d / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=69"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "0.1.0"

            [tool.setuptools]
            packages = ["{module}"]

            [project.entry-points."kdbench.losses"]
            """
        )
        + eps
        + "\n"
    )
    return d


TWIN = """
from kdbench.methods.ce import CE


class Twin(CE):
    '''A plugin whose name another distribution also claims.'''
"""

CRASHERS = """
import ctypes
import os
import time

from kdbench.methods.ce import CE


class ExitLoss(CE):
    '''Kills its process the hard way, as a plugin calling os._exit would.'''

    def forward(self, s, t, batch):
        os._exit(1)


class SegvLoss(CE):
    '''Segfaults, as a broken C extension would.'''

    def forward(self, s, t, batch):
        ctypes.string_at(0)


class SlowLoss(CE):
    '''CE that takes 0.4 s a step (a cell slower than its time limit); same numbers as CE.'''

    def forward(self, s, t, batch):
        time.sleep(0.4)
        return super().forward(s, t, batch)


class HangLoss(CE):
    '''Never returns from its first step, as a deadlock in native code would.'''

    def forward(self, s, t, batch):
        while True:
            time.sleep(60)


class FlakyLoss(CE):
    '''Kills its process on the first attempt only (the file KDBENCH_TEST_FLAKY marks it).'''

    def forward(self, s, t, batch):
        mark = os.environ["KDBENCH_TEST_FLAKY"]
        if not os.path.exists(mark):
            open(mark, "w").close()
            os._exit(1)
        return super().forward(s, t, batch)
"""


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """Real distributions, installed by pip into a site directory (used via PYTHONPATH):
    two twins registering the loss ``twin``, and one with losses that crash their process."""
    src = tmp_path_factory.mktemp("plugin_src")
    dists = [
        _write_dist(src, "kdbench-twin-a", "kdbench_twin_a", {"twin": "kdbench_twin_a:Twin"}, TWIN),
        _write_dist(src, "kdbench-twin-b", "kdbench_twin_b", {"twin": "kdbench_twin_b:Twin"}, TWIN),
        _write_dist(
            src,
            "kdbench-crashers",
            "kdbench_crashers",
            {
                "crash_exit": "kdbench_crashers:ExitLoss",
                "crash_segv": "kdbench_crashers:SegvLoss",
                "slow": "kdbench_crashers:SlowLoss",
                "hang": "kdbench_crashers:HangLoss",
                "flaky": "kdbench_crashers:FlakyLoss",
            },
            CRASHERS,
        ),
    ]
    site = tmp_path_factory.mktemp("plugin_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(site)]
        + [str(d) for d in dists],
        check=True,
        capture_output=True,
        text=True,
    )
    return site


def tiny(
    tmp: Path, methods: str = "[ce]", seeds: str = "[0]", epochs: int = 1, name: str = "grid.yaml"
) -> Path:
    path = tmp / name
    path.write_text(
        textwrap.dedent(TINY_GRID.format(out=tmp / "runs", methods=methods, seeds=seeds, epochs=epochs))
    )
    return path


# --------------------------------------------------------------------------- bad grid files


def test_bad_grid_files_are_one_clear_error_each(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: x\ndatasets: [digits]\n\x89PNG\r\n\x1a\n\xff\xfe")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: x\n\nmethods: [ce\x00]\n")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 10^9 strings once expanded, 400 bytes on disk
    twice = tmp_path / "twice.yaml"  # YAML itself would keep the second silently
    twice.write_text("name: x\ndatasets: [digits]\nmethods: [kd]\nmethods: [ce]\n")
    assert bomb.stat().st_size < 1024
    cases = {
        tmp_path: "is a directory",
        binary: "binary.yaml:3: not UTF-8 text",
        nul: "nul.yaml:3: contains a NUL byte",
        bomb: "bomb.yaml: its anchors and aliases expand to more than",
        twice: "twice.yaml:4: malformed YAML: the key 'methods' is written twice in one mapping (first on",
    }
    for path, message in cases.items():
        r = kdbench_cli("run", str(path))
        assert r.returncode == 2, (path, r.stderr)
        assert message in r.stderr and str(path) in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_ordinary_anchors_and_aliases_still_work(tmp_path):
    grid = tmp_path / "anchors.yaml"
    grid.write_text(
        textwrap.dedent(
            f"""\
            name: anchors
            output: {tmp_path / "runs"}
            datasets: [{{digits: {{limit: 100}}}}]
            pairs:
              - teacher: &small {{smallcnn: {{width: 4}}}}
                student: *small
            methods: [ce, kd]
            teacher_train: &recipe {{epochs: 1, batch_size: 32, lr: 0.05, views: {{}}}}
            train: *recipe
            """
        )
    )
    g = load_grid(grid)
    assert g.config.train == g.config.teacher_train and g.config.train.batch_size == 32
    assert g.pairs[0][0].params == g.pairs[0][1].params


def test_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 9^12 = 2.8e11 nodes expanded
    with pytest.raises(ConfigError, match="alias bomb"):
        load_yaml(bomb)
    # just under the bound, the same structure loads
    small = tmp_path / "small.yaml"
    small.write_text("\n".join(lines[:4]) + "\n")
    data, _ = load_yaml(small)
    assert len(data["a3"]) == 9 and data["a3"][0][0][0] == data["a0"]


def test_yaml_syntax_errors_still_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethods: [ce\n  pairs: {\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: malformed YAML"):
        load_yaml(bad)
    with pytest.raises(yaml.YAMLError):  # the test file itself is really malformed
        yaml.safe_load(bad.read_text())


# --------------------------------------------------------------------------- one driver per run dir


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


HOLD = """
import sys, time
from pathlib import Path
from kdbench.rundir import RunLock
with RunLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_driver_refuses_naming_host_and_pid_and_touches_nothing(tmp_path):
    grid = tiny(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(run_dir)
        r = kdbench_cli("run", str(grid))
        assert r.returncode == 2, r.stderr
        assert f"host {platform.node()}, PID {holder.pid}" in r.stderr and str(run_dir) in r.stderr
        assert "Traceback" not in r.stderr
        assert _tree(run_dir) == before  # no store, no cells, no grid copy: nothing touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its lock file is still there, and binds nobody
    assert (run_dir / RunLock.NAME).read_text().split()[1] == str(holder.pid)
    with RunLock(run_dir):
        assert (run_dir / RunLock.NAME).read_text().split()[1] == str(os.getpid())
        with pytest.raises(RunDirBusy), RunLock(run_dir):  # and it excludes within one host too
            pass


# --------------------------------------------------------------------------- twin plugins


def test_twin_plugins_are_listed_and_fail_only_where_used(plugin_site, tmp_path):
    env = {"PYTHONPATH": str(plugin_site)}
    r = kdbench_cli("list", "losses", env=env)
    assert r.returncode == 0, r.stderr
    twin_rows = [ln for ln in r.stdout.splitlines() if "twin" in ln]
    assert len(twin_rows) == 2 and all("CONFLICT" in ln for ln in twin_rows), r.stdout
    assert any("kdbench-twin-a" in ln for ln in twin_rows) and any("kdbench-twin-b" in ln for ln in twin_rows)
    assert " kd " in r.stdout and " dkd " in r.stdout  # the built-ins are all there
    j = kdbench_cli("list", "losses", "--json", env=env)
    rows = json.loads(j.stdout)
    assert sorted(x["dist"] for x in rows if x["name"] == "twin") == ["kdbench-twin-a", "kdbench-twin-b"]
    assert all(x["conflict"] == (x["name"] == "twin") for x in rows)

    ok = kdbench_cli("run", str(tiny(tmp_path, "[ce, kd]")), "--dry-run", env=env)
    assert ok.returncode == 0, ok.stderr
    bad = kdbench_cli("run", str(tiny(tmp_path, "[ce, twin]", name="twin.yaml")), env=env)
    assert bad.returncode == 2
    errors = [ln for ln in bad.stderr.splitlines() if "twin" in ln and "registered by" in ln]
    assert len(errors) == 1, bad.stderr
    assert (
        "methods[1]" in errors[0]
        and "kdbench-twin-a 0.1.0" in errors[0]
        and "kdbench-twin-b 0.1.0" in errors[0]
    )
    assert "loss plugin 'twin'" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_unknown_loss_message_says_loss(tmp_path):
    r = kdbench_cli("run", str(tiny(tmp_path, "[ce, kdd]")))
    assert r.returncode == 2 and "unknown loss 'kdd'" in r.stderr
    assert not re.search(r"losse\b", r.stderr)


# --------------------------------------------------------------------------- unwritable output


def run_unprivileged(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI without the power to ignore permission bits. Root ignores them (a chmod alone
    would not make a directory unwritable for it), so as root the CLI runs without the
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH capabilities: the write bit off then binds it too."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("tests run as root and setpriv is missing: root ignores the write bit")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    env = {**os.environ, "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "kdbench.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_unwritable_output_directory_exit_2_naming_it(tmp_path):
    out = tmp_path / "archive"
    out.mkdir()
    grid = tmp_path / "grid.yaml"
    grid.write_text(TINY_GRID.format(out=out, methods="[ce]", seeds="[0]", epochs=1))
    out.chmod(0o555)
    r = run_unprivileged("run", str(grid), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"output directory {out} is not writable (Permission denied)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert list(out.iterdir()) == []
    # the run dir exists but is read-only: same answer, nothing written inside it
    out.chmod(0o755)
    (out / "tiny").mkdir()
    (out / "tiny").chmod(0o555)
    r = run_unprivileged("run", str(grid), cwd=tmp_path)
    assert r.returncode == 2 and f"output directory {out / 'tiny'} is not writable" in r.stderr, r.stderr
    assert list((out / "tiny").iterdir()) == []


# --------------------------------------------------------------------------- CPU budget


def test_cgroup_quota_v2_v1_and_nested(tmp_path):
    proc = tmp_path / "cgroup"
    fs = tmp_path / "fs"
    (fs / "slurm" / "job_1").mkdir(parents=True)
    proc.write_text("0::/slurm/job_1\n")
    assert _cgroup_quota(proc, fs) is None
    (fs / "slurm" / "job_1" / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(proc, fs) is None
    (fs / "slurm" / "cpu.max").write_text("300000 100000\n")  # a parent's limit binds the child
    assert _cgroup_quota(proc, fs) == 3.0
    (fs / "slurm" / "job_1" / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(proc, fs) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    proc.write_text("12:cpu,cpuacct:/docker/abc\n5:memory:/docker/abc\n")
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(proc, v1) == 2.0
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(proc, v1) is None


def test_cpu_budget_follows_the_affinity_mask():
    assert 1 <= cpu_budget() <= len(os.sched_getaffinity(0))
    code = "from kdbench.procs import cpu_budget; print(cpu_budget())"
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0 and "taskset" in (r.stderr or ""):
        pytest.skip(f"taskset unavailable: {r.stderr.strip()}")
    assert r.stdout.strip() == "1", r.stderr


def test_workers_times_threads_never_oversubscribe(tmp_path, monkeypatch):
    from rich.console import Console

    from kdbench import runner

    grid = tiny(tmp_path)
    text = grid.read_text().replace("eval:", "executor: {threads: 2, workers: 4}\neval:")
    grid.write_text(text)
    p = runner.plan(load_grid(grid))
    console = Console(file=open(os.devnull, "w"))

    def fitted(workers):
        ex = runner.build_executor(p.executor, workers, console)
        threads = runner.fit_threads(p, ex, console)
        return ex.workers, threads

    monkeypatch.setattr(runner, "cpu_budget", lambda: 4)
    assert fitted(None) == (2, 2)
    assert fitted(1) == (1, 2)
    monkeypatch.setattr(runner, "cpu_budget", lambda: 1)
    assert fitted(None) == (1, 1)


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_sees_bytes_in_the_middle_and_is_cached(tmp_path, monkeypatch):
    from kdbench.datasets import _util
    from kdbench.datasets.cifar import CIFAR10
    from tests.test_datasets import write_cifar10

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    d = write_cifar10(tmp_path / "data", per_batch=64)
    batch = d / "data_batch_3"
    before = CIFAR10(root=str(d)).fingerprint()
    data = bytearray(batch.read_bytes())
    assert len(data) > 3 * (1 << 16)  # the middle is outside the first and last 64 KiB
    mid = len(data) // 2
    data[mid] ^= 0xFF
    time.sleep(0.01)
    batch.write_bytes(bytes(data))  # same size, one byte changed
    after = CIFAR10(root=str(d)).fingerprint()
    assert after["files"]["data_batch_3"] != before["files"]["data_batch_3"]
    assert after["files"]["data_batch_1"] == before["files"]["data_batch_1"]
    # cached: a second fingerprint reads the digest from the cache, keyed by size, mtime and inode
    entries = list((tmp_path / "cache" / "digests").iterdir())
    assert len(entries) == len(before["files"]) + 1
    calls = []
    real = _util.hashlib.sha256
    monkeypatch.setattr(_util.hashlib, "sha256", lambda *a: calls.append(a) or real(*a))
    assert CIFAR10(root=str(d)).fingerprint() == after and calls == []
    time.sleep(0.01)
    batch.touch()  # a new mtime: hashed again
    assert CIFAR10(root=str(d)).fingerprint() == after and len(calls) == 1


def test_imagefolder_fingerprint_covers_each_file_size_and_mtime(tmp_path):
    from kdbench.datasets.folder import ImageFolderDataset
    from tests.test_datasets import write_folder

    write_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    before = ImageFolderDataset(root=str(tmp_path)).fingerprint()
    img = next((tmp_path / "train" / "a").iterdir())
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ImageFolderDataset(root=str(tmp_path)).fingerprint()["files"] != before["files"]


def test_packaged_datasets_fingerprint_without_parsing(monkeypatch, tmp_path):
    from kdbench.datasets.mnist import MNIST5k

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(MNIST5k, "_raw", lambda self: pytest.fail("parsed the CSV to fingerprint it"))
    fp = MNIST5k().fingerprint()
    assert len(fp["files"]["mnist_5k.csv.gz"]) == 16


def test_registry_keeps_the_builtins_when_twins_exist(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    registry.clear_cache()
    try:
        assert registry.info("losses", "kd").dist == "kdbench"
        assert registry.conflict_message("losses", "twin") is not None
        assert registry.conflict_message("losses", "kd") is None
    finally:
        registry.clear_cache()


def test_root_readme_describes_the_guarantees():
    text = (ROOT / "README.md").read_text()
    assert "## What kdbench guarantees" in text
