"""Process primitives shared by every place that starts processes (the local pool, DDP ranks,
the runner): how many CPUs this process may use, dying with the parent, naming a death.

Nothing here imports kdbench: the pool (an executor) and the DDP launcher (the engine) both
use it without importing each other.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

#: seconds between a worker's checks that its driver is alive (the portable fallback)
WATCHDOG_PERIOD = 0.5

# --------------------------------------------------------------------------- CPU budget


def _cgroup_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"), fs: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max`` or v1 CFS quota) of this process, or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: float | None = None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        ctrl = set(controllers.split(","))
        if controllers == "":  # v2: one unified hierarchy
            dirs, read = [fs], _v2_quota
        elif "cpu" in ctrl:  # v1: the cpu controller's own hierarchy
            dirs, read = [fs / controllers, fs / "cpu", fs / "cpu,cpuacct"], _v1_quota
        else:
            continue
        for base in dirs:
            # the effective limit is the tightest one on the path from the root to this cgroup
            d = base / rel.lstrip("/")
            while True:
                q = read(d)
                if q is not None:
                    best = q if best is None else min(best, q)
                if d == base or base not in d.parents:
                    break
                d = d.parent
    return best


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask (Slurm ``--cpus-per-task``, taskset),
    capped by the cgroup CPU quota (containers); never the machine's core count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        n = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit within seconds of ``parent_pid`` dying."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog below still works
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="kdbench-parent-watchdog", daemon=True).start()


def death_reason(exitcode: int | None) -> str:
    """``-11`` -> "killed by signal SIGSEGV", ``1`` -> "exited with code 1"."""
    if exitcode is None:
        return "vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = {"SIGSEGV": " (a crash in native code)", "SIGKILL": " (out of memory?)"}.get(name, "")
        return f"killed by signal {name}{hint}"
    return f"exited with code {exitcode}"
