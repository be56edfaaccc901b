"""The ``kdbench`` command line: run, report, list, bench.

Exit codes: 0 success, 1 some cells failed (the others are recorded), 2 user error
(bad grid, unknown plugin, missing data), 130 interrupted (run again to resume).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdbench import registry
from kdbench.errors import KdbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="kdbench: knowledge-distillation sweeps, leaderboards and kernels.",
)
err = Console(stderr=True, soft_wrap=True)
out = Console()


@app.command()
def run(
    grid: Annotated[Path, typer.Argument(help="the grid YAML file")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run directory (default: output/name)")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="parallel local workers")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="validate and list the cells (done or to run); write nothing")
    ] = False,
    executor: Annotated[
        str | None,
        typer.Option("--executor", help="executor plugin (local, submitit, ray); overrides the grid's kind"),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="submit the cells and return (collect with `kdbench run` again)")
    ] = False,
) -> None:
    """Run (or resume) a sweep, then print its leaderboard."""
    from kdbench.config import load_grid
    from kdbench.report import report
    from kdbench.runner import execute, plan

    t0 = time.perf_counter()
    p = plan(load_grid(grid), out_dir, executor)
    err.print(
        f"[bold]{p.grid.config.name}[/bold]: {len(p.cells)} cells, {len(p.teachers)} teacher(s) → {p.run_dir}"
    )
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
        row = (c.method.label, f"{c.teacher.label} → {c.student.label}", c.method.resolved() or "-")
        row += (seen_by["student"], seen_by["teacher"])
        if row not in seen:
            seen.add(row)
            resolved.add_row(*(escape(x) for x in row))
    out.print(resolved)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (holds results.sqlite)")],
    fmt: Annotated[str, typer.Option("--format", help="github | latex | csv | json")] = "github",
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
            "best_test (optimistic: selected on the test set)"
        ),
    ] = "last",
    spread: Annotated[str, typer.Option(help="spread over seeds: std | sem | ci95")] = "std",
    baseline: Annotated[
        str | None, typer.Option(help="mark methods not significantly different from this method")
    ] = None,
    kind: Annotated[
        str, typer.Option(help="leaderboard | groups | shift | corruptions | status")
    ] = "leaderboard",
    plot: Annotated[
        str | None,
        typer.Option(
            help="also draw into this PNG: --kind groups per-group accuracy bars, "
            "--kind corruptions accuracy vs severity"
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
    out.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command("list")
def list_cmd(
    kind: Annotated[
        str | None, typer.Argument(help="models | teachers | losses | augmenters | datasets")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List registered plugins and the distribution providing each (nothing is imported)."""
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
        out.print_json(json.dumps([{**i.to_dict(), "conflict": clash} for i, clash in infos]))
        return
    table = Table("kind", "name", "provided by", "object")
    for i, clash in infos:
        name = f"{i.name} (CONFLICT)" if clash else i.name
        table.add_row(i.kind, name, f"{i.dist} {i.version}", i.value)
    out.print(table)
    clashes = sorted({(i.kind, i.name) for i, clash in infos if clash})
    for k, n in clashes:
        err.print(f"[yellow]warning:[/yellow] {registry.conflict_message(k, n)}", highlight=False)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="small sizes, few repeats")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the results as JSON")] = None,
    threads: Annotated[str | None, typer.Option("--threads", help="torch thread counts, e.g. 1,2")] = None,
    only: Annotated[str | None, typer.Option("--only", help="one op: kd, dkd or cka")] = None,
) -> None:
    """Micro-benchmark the fused kernels against eager and compiled PyTorch."""
    from kdbench.bench import bench_command

    bench_command(quick=quick, json=json_path, threads=threads, only=only)


@app.command("status")
def status_cmd(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Every cell of a run: done, failed (why), running (where), submitted, pending; and the teachers."""
    from kdbench.status import print_status

    print_status(run_dir, out)


@app.command("cka")
def cka_cmd(
    grid_or_run: Annotated[Path, typer.Argument(help="a grid YAML file or a run directory")],
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
    grid_or_run: Annotated[Path, typer.Argument(help="a grid YAML file or a run directory")],
    probe: Annotated[int, typer.Option("--probe", min=4, help="probe images")] = 64,
    method: Annotated[str, typer.Option("--method", help="measured results to correlate with")] = "kd",
) -> None:
    """Score every student against its teacher without training (DisWOT, CKA)."""
    from kdbench.analysis.commands import rank_students

    out.print(rank_students(grid_or_run, probe, method), highlight=False)


@app.command("plot")
def plot_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="where the PNGs go")] = None,
    metric: Annotated[str, typer.Option("--metric", help="metric to draw")] = "top1",
) -> None:
    """Learning curves and the leaderboard as PNGs."""
    from kdbench.analysis.commands import plot

    for f in plot(run_dir, out_dir, metric):
        out.print(str(f))


_TERMINATED = False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (Slurm before a kill, a container stopping): every running cell checkpoints at its
    next step boundary, then the driver exits 143 and a rerun resumes from there."""
    global _TERMINATED
    from kdbench.engine.train import request_stop

    _TERMINATED = True
    request_stop()


def main() -> None:
    """Entry point: user errors print without a traceback."""
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = app(standalone_mode=False)  # returns the exit code of typer.Exit instead of raising
        if rc == 130:  # click turned a KeyboardInterrupt (Ctrl-C, or our SIGTERM stop) into 130
            raise KeyboardInterrupt
        sys.exit(rc if isinstance(rc, int) else 0)
    except KdbenchError as e:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if _TERMINATED:
            err.print("stopped by SIGTERM: cells checkpointed at a step boundary; run again to resume")
            sys.exit(143)
        err.print("interrupted; run the same command again to resume")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):  # click's wrapping of KeyboardInterrupt
            if _TERMINATED:
                err.print("stopped by SIGTERM: cells checkpointed at a step boundary; run again to resume")
                sys.exit(143)
            err.print("interrupted; run the same command again to resume")
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
