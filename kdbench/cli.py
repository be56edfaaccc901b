"""The ``kdbench`` command line: run, report, list, bench.

Exit codes: 0 success, 1 some cells failed (the others are recorded), 2 user error
(bad grid, unknown plugin, missing data), 130 interrupted (run again to resume).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdbench import registry
from kdbench.errors import KdbenchError
from kdbench.report_choices import FORMATS, KINDS, SELECTS, SPREADS

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="kdbench: knowledge-distillation sweeps, leaderboards and kernels.",
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)  # paths and lines print whole (tables lay themselves out)


# --- completion: plugin names from the entry points (nothing imported), run dirs, grid files


def _complete_plugins(kind: str) -> Callable[[str], list[str]]:
    def complete(incomplete: str) -> list[str]:
        return [n for n in registry.names(kind) if n.startswith(incomplete)]

    return complete


def _complete_choices(*values: str) -> Callable[[str], list[str]]:
    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return complete


def _complete_paths(incomplete: str, keep: Callable[[Path], bool]) -> list[str]:
    """Paths starting with ``incomplete`` that ``keep`` accepts, and directories to descend into."""
    head = Path(incomplete)
    base, stem = (head, "") if incomplete.endswith("/") or not incomplete else (head.parent, head.name)
    out: list[str] = []
    try:
        entries = sorted(base.iterdir()) if str(base) else sorted(Path(".").iterdir())
    except OSError:
        return out
    for p in entries:
        if not p.name.startswith(stem) or (p.name.startswith(".") and not stem.startswith(".")):
            continue
        shown = str(p) if str(base) != "." or incomplete.startswith("./") else p.name
        if keep(p):
            out.append(shown)
        elif p.is_dir():
            out.append(shown + "/")
    return out


def _complete_run_dirs(incomplete: str) -> list[str]:
    """Run directories (they hold results.sqlite) and the folders that lead to them."""
    return _complete_paths(incomplete, lambda p: (p / "results.sqlite").exists())


def _complete_grids(incomplete: str) -> list[str]:
    return _complete_paths(incomplete, lambda p: p.is_file() and p.suffix in (".yaml", ".yml"))


def _complete_grid_or_run(incomplete: str) -> list[str]:
    return _complete_paths(
        incomplete,
        lambda p: (p / "results.sqlite").exists() or (p.is_file() and p.suffix in (".yaml", ".yml")),
    )


def version_text() -> str:
    """kdbench's version (and git sha from a checkout), torch, CUDA, and the kernel backend."""
    import torch

    from kdbench import __version__, kernels
    from kdbench.engine.cell import git_sha

    sha = git_sha()
    lines = [f"kdbench {__version__}" + (f" (git {sha[:12]})" if sha else "")]
    lines.append(f"torch {torch.__version__}")
    if torch.cuda.is_available():
        gpus = f"{torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name(0)}"
        lines.append(f"CUDA {torch.version.cuda}: {gpus}")
    else:
        built = f" (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else ""
        lines.append(f"CUDA: no GPU visible{built}")
    gram = kernels.gram_backend()
    lines.append(f"kernels: {kernels.backend()} (CKA Grams: {gram['gram']}, {gram['reason']})")
    return "\n".join(lines)


def _version(value: bool) -> None:
    if value:
        out.print(version_text(), markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_version,
            is_eager=True,
            help="kdbench, torch, CUDA and kernel versions",
        ),
    ] = False,
) -> None:
    """kdbench: knowledge-distillation sweeps, leaderboards and kernels."""


@app.command()
def run(
    grid: Annotated[
        Path, typer.Argument(metavar="GRID", help="the grid YAML file", autocompletion=_complete_grids)
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run directory (default: output/name)")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="parallel local workers")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="validate and list the cells (done or to run); write nothing")
    ] = False,
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            help="executor plugin (local, submitit, ray); overrides the grid's kind",
            autocompletion=_complete_plugins("executors"),
        ),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="submit the cells and return (collect with `kdbench run` again)")
    ] = False,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="override a grid key (dotted key, YAML value), e.g. --set train.epochs=2 "
            "--set 'methods=\\[kd, {dkd: {beta: 2}}]'; repeatable, checked like the file",
        ),
    ] = None,
) -> None:
    """Run (or resume) a sweep, then print its leaderboard."""
    from kdbench.config import load_grid
    from kdbench.report import report
    from kdbench.runner import execute, plan

    t0 = time.perf_counter()
    p = plan(load_grid(grid, sets or ()), out_dir, executor)
    err.print(
        f"[bold]{p.grid.config.name}[/bold]: {len(p.cells)} cells, {len(p.teachers)} teacher(s) → {p.run_dir}"
    )
    if p.grid.overrides:
        err.print("with " + " ".join(f"--set {escape(o)}" for o in p.grid.overrides), highlight=False)
    if dry_run:
        _print_plan(p)
        if p.incompatible:  # these cells would fail: say so, with the grid line, and exit 1
            err.print(f"[red]{len(p.incompatible)} cell(s) cannot run[/red] (a run records them as failed):")
            for msg in sorted(set(p.incompatible.values())):
                err.print(f"  {escape(msg)}", highlight=False)
            raise typer.Exit(1)
        return
    counts = execute(p, workers, err, detach)
    err.print(
        f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']} "
        + (f"submitted {counts['submitted']} " if counts.get("submitted") else "")
        + (f"still running {counts['running']} " if counts.get("running") else "")
        + _forwards_saved(counts)
        + f"in {time.perf_counter() - t0:.1f} s"
    )
    if detach:
        return
    out.print(report(p.run_dir), markup=False, highlight=False, soft_wrap=True)
    if counts["failed"]:
        raise typer.Exit(1)


def _forwards_saved(counts: dict) -> str:
    """ "(teacher forwards: 40 reused of 60) " when cells shared a teacher, else ""."""
    reused, computed = counts.get("teacher_forwards_reused", 0), counts.get("teacher_forwards_computed", 0)
    if not reused:
        return ""
    return f"(teacher forwards: {reused} reused of {reused + computed}) "


def _print_plan(p) -> None:
    """One line per cell: its id, what it is, and whether a result is already on disk."""
    table = Table("cell", "dataset", "teacher → student", "method", "seed", "state")
    for c in p.cells:
        done = (p.run_dir / "cells" / c.id / "result.json").exists()
        state = "done" if done else ("partial" if (p.run_dir / "cells" / c.id).exists() else "to run")
        state = "incompatible" if c.id in p.incompatible else state
        pair = f"{c.teacher.label} → {c.student.label}"
        table.add_row(c.id, c.dataset.name, pair, c.method.label, str(c.seed), state)
    out.print(table)
    # every method's parameters, loss weights and views as its cells run them, once per pair
    from kdbench.engine import views

    resolved = Table(
        "method",
        "teacher → student",
        "parameters as run; (preset): the preset's value",
        "student sees",
        "teacher sees",
    )
    seen: set[tuple[str, ...]] = set()
    for c in p.cells:
        seen_by = views.describe(c)
        params = "; ".join(x for x in (c.method.resolved(), p.built.get(c.id, "")) if x) or "-"
        row = (c.method.label, f"{c.teacher.label} → {c.student.label}", params)
        row += (seen_by["student"], seen_by["teacher"])
        if row not in seen:
            seen.add(row)
            resolved.add_row(*(escape(x) for x in row))
    out.print(resolved)


@app.command("report")
def report_cmd(
    run_dir: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_DIR",
            help="a run directory (holds results.sqlite)",
            autocompletion=_complete_run_dirs,
        ),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="github | latex | csv | json | html (a self-contained page, by default RUN_DIR/report.html)",
            autocompletion=_complete_choices(*FORMATS),
        ),
    ] = "github",
    metric: Annotated[
        str, typer.Option(help="leaderboard metric: top1, nll, ece, worst_group, val/top1, c/fog/3/top1, ...")
    ] = "top1",
    details: Annotated[
        bool, typer.Option("--details", help="also every metric per cell (github format)")
    ] = False,
    everything: Annotated[
        bool, typer.Option("--all", help="every cell in the store, not only the grid last run here")
    ] = False,
    select: Annotated[
        str,
        typer.Option(
            help="which epoch: last | best_val (best validation value of --metric) | "
            "best_test (optimistic: selected on the test set)",
            autocompletion=_complete_choices(*SELECTS),
        ),
    ] = "last",
    spread: Annotated[
        str,
        typer.Option(help="spread over seeds: std | sem | ci95", autocompletion=_complete_choices(*SPREADS)),
    ] = "std",
    baseline: Annotated[
        str | None,
        typer.Option(
            help="mark methods not significantly different from this method",
            autocompletion=_complete_plugins("losses"),
        ),
    ] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="leaderboard | groups | shift | corruptions | status",
            autocompletion=_complete_choices(*KINDS),
        ),
    ] = "leaderboard",
    plot: Annotated[
        str | None,
        typer.Option(
            help="also draw into this PNG: --kind groups per-group accuracy bars, "
            "--kind corruptions accuracy vs severity"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="write the report to this file (atomically) instead of printing it"
        ),
    ] = None,
) -> None:
    """Print the leaderboard (or another report kind) of a run from its results store."""
    from kdbench.report import report

    text = report(
        run_dir,
        fmt,
        metric,
        details,
        everything,
        select=select,
        spread=spread,
        baseline=baseline,
        kind=kind,
        plot=plot,
    )
    if output is None and fmt == "html":  # a page is a file to open, not text for the terminal
        output = run_dir / "report.html"
    if output is None:
        out.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    from kdbench.artifacts import write_bytes_atomic

    try:
        write_bytes_atomic(output, (text if text.endswith("\n") else text + "\n").encode())
    except OSError as e:
        raise KdbenchError(f"cannot write {output}: {e.strerror or e}") from None
    err.print(f"wrote {output}", highlight=False)


@app.command("list")
def list_cmd(
    kind: Annotated[
        str | None,
        typer.Argument(
            help="models | teachers | losses | augmenters | datasets | executors",
            autocompletion=lambda incomplete: [k for k in registry.kinds() if k.startswith(incomplete)],
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List registered plugins, the paper each cites and the distribution providing it (none imported)."""
    kinds = [kind] if kind else registry.kinds()
    for k in kinds:
        if k not in registry.GROUPS:
            raise KdbenchError(
                f"unknown plugin kind {k!r}{registry.did_you_mean(k, registry.kinds())}; "
                f"choose one of: {', '.join(registry.kinds())}"
            )
    infos = [
        (i, len(registry.claimants(k, n)) > 1)
        for k in kinds
        for n in registry.names(k)
        for i in registry.claimants(k, n)
    ]
    if as_json:
        rows = [{**i.to_dict(), "paper": registry.paper(i.value), "conflict": clash} for i, clash in infos]
        out.print_json(json.dumps(rows))
        return
    table = Table("kind", "name", "paper", "provided by", "object")
    for i, clash in infos:
        name = f"{i.name} (CONFLICT)" if clash else i.name
        table.add_row(i.kind, name, escape(registry.paper(i.value) or "-"), f"{i.dist} {i.version}", i.value)
    out.print(table)
    clashes = sorted({(i.kind, i.name) for i, clash in infos if clash})
    for k, n in clashes:
        err.print(f"[yellow]warning:[/yellow] {registry.conflict_message(k, n)}", highlight=False)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="small sizes, few repeats")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the results as JSON")] = None,
    threads: Annotated[str | None, typer.Option("--threads", help="torch thread counts, e.g. 1,2")] = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only", help="one op: kd, dkd or cka", autocompletion=_complete_choices("kd", "dkd", "cka")
        ),
    ] = None,
) -> None:
    """Micro-benchmark the fused kernels against eager and compiled PyTorch."""
    from kdbench.bench import bench_command

    bench_command(quick=quick, json=json_path, threads=threads, only=only)


@app.command("status")
def status_cmd(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="a run directory", autocompletion=_complete_run_dirs)
    ],
) -> None:
    """Every cell of a run: done, failed (why), running (where), submitted, pending; and the teachers."""
    from kdbench.status import print_status

    print_status(run_dir, out)


@app.command("cka")
def cka_cmd(
    grid_or_run: Annotated[
        Path,
        typer.Argument(
            metavar="GRID_OR_RUN",
            help="a grid YAML file or a run directory",
            autocompletion=_complete_grid_or_run,
        ),
    ],
    pair: Annotated[int, typer.Option("--pair", min=0, help="which pair of the grid (0-based)")] = 0,
    out_dir: Annotated[Path | None, typer.Option("--out", help="where the PNG and CSV go")] = None,
    probe: Annotated[int, typer.Option("--probe", min=4, help="probe images")] = 256,
    groups: Annotated[int | None, typer.Option("--groups", min=1, help="ckakd groups to draw")] = None,
) -> None:
    """Layer-by-layer CKA between a pair's teacher and student: heatmap PNG and CSV."""
    from kdbench.analysis.commands import cka

    for f in cka(grid_or_run, pair, out_dir, probe, groups):
        out.print(str(f))


@app.command("rank-students")
def rank_students_cmd(
    grid_or_run: Annotated[
        Path,
        typer.Argument(
            metavar="GRID_OR_RUN",
            help="a grid YAML file or a run directory",
            autocompletion=_complete_grid_or_run,
        ),
    ],
    probe: Annotated[int, typer.Option("--probe", min=4, help="probe images")] = 64,
    method: Annotated[
        str,
        typer.Option(
            "--method", help="measured results to correlate with", autocompletion=_complete_plugins("losses")
        ),
    ] = "kd",
) -> None:
    """Score every student against its teacher without training (DisWOT, CKA)."""
    from kdbench.analysis.commands import rank_students

    out.print(rank_students(grid_or_run, probe, method), highlight=False)


@app.command("plot")
def plot_cmd(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="a run directory", autocompletion=_complete_run_dirs)
    ],
    out_dir: Annotated[Path | None, typer.Option("--out", help="where the PNGs go")] = None,
    metric: Annotated[str, typer.Option("--metric", help="metric to draw")] = "top1",
) -> None:
    """Learning curves and the leaderboard as PNGs."""
    from kdbench.analysis.commands import plot

    for f in plot(run_dir, out_dir, metric):
        out.print(str(f))


@app.command("softlabels")
def softlabels_cmd(
    grid: Annotated[
        Path, typer.Argument(metavar="GRID", help="the grid YAML file", autocompletion=_complete_grids)
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run directory (default: output/name)")
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="override a grid key, as for `kdbench run`"),
    ] = None,
) -> None:
    """Build the soft-label banks of the grid's replaying cells (teacher_outputs), ahead of `kdbench run`."""
    from kdbench.config import load_grid
    from kdbench.runner import build_softlabels, plan

    p = plan(load_grid(grid, sets or ()), out_dir)
    banks = build_softlabels(p)
    if not banks:
        err.print(
            "no cell of this grid replays soft labels (train: {teacher_outputs: ...}); nothing to build"
        )
    for b in banks:
        out.print(str(b), highlight=False)


@app.command("new")
def new_cmd(
    kind: Annotated[
        str,
        typer.Argument(
            metavar="KIND",
            help="method | dataset | model",
            autocompletion=_complete_choices("method", "dataset", "model"),
        ),
    ],
    name: Annotated[str, typer.Argument(metavar="NAME", help="the plugin's name (lowercase, e.g. my_kd)")],
    directory: Annotated[
        Path, typer.Option("--dir", help="where the package directory kdbench-NAME is created")
    ] = Path("."),
) -> None:
    """Start a plugin: a pip-installable package with its entry point, module, test and README."""
    from kdbench.scaffold import new_plugin

    files = new_plugin(kind, name, directory)
    root = files[0].parent
    for f in files:
        out.print(str(f), highlight=False)
    err.print(
        f"next: pip install -e {root} && kdbench list {'losses' if kind == 'method' else kind + 's'} "
        f"&& python -m pytest {root / 'tests'}",
        highlight=False,
    )


_TERMINATED = False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (Slurm before a kill, a container stopping): every running cell checkpoints at its
    next step boundary, then the driver exits 143 and a rerun resumes from there."""
    global _TERMINATED
    from kdbench.engine.train import request_stop

    _TERMINATED = True
    request_stop()


def _click_classes() -> tuple[type[BaseException], type[BaseException]]:
    """(ClickException, Abort) of the click that typer uses (typer may vendor its own copy)."""
    base = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return base, typer.Abort


def _crash_log(exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected error to a log file; its path (None: not writable)."""
    import datetime
    import os
    import traceback

    from kdbench.datasets._util import cache_dir

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = cache_dir() / "logs" / f"crash-{stamp}-{os.getpid()}.log"
    text = f"kdbench {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path


def _interrupted() -> None:
    if _TERMINATED:
        err.print("stopped by SIGTERM: cells checkpointed at a step boundary; run again to resume")
        sys.exit(143)
    err.print("interrupted; run the same command again to resume")
    sys.exit(130)


def main() -> None:
    """Entry point. Usage mistakes print the usage line and the problem (exit 2); user errors
    (a bad grid, a missing run) one message (exit 2); an unexpected error one line and the path
    of a log holding its traceback (exit 1; KDBENCH_DEBUG=1 shows the traceback instead)."""
    import os
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    click_error, click_abort = _click_classes()
    try:
        rc = app(standalone_mode=False, prog_name="kdbench")  # returns typer.Exit's code instead of raising
        if rc == 130:  # click turned a KeyboardInterrupt (Ctrl-C, or our SIGTERM stop) into 130
            raise KeyboardInterrupt
        sys.exit(rc if isinstance(rc, int) else 0)
    except KdbenchError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except click_abort:  # click's wrapping of KeyboardInterrupt
        _interrupted()
    except click_error as e:  # usage: missing argument, unknown option or command, bad value
        e.show()  # type: ignore[attr-defined]
        sys.exit(2)
    except Exception as e:
        if os.environ.get("KDBENCH_DEBUG"):
            raise
        log = _crash_log(e)
        where = f"traceback in {log}" if log else "rerun with KDBENCH_DEBUG=1 for the traceback"
        first = str(e).splitlines()[0] if str(e) else ""
        err.print(
            f"[red]internal error:[/red] {escape(type(e).__name__)}: {escape(first)}"
            f" ({escape(where)}; please report it)",
            highlight=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
