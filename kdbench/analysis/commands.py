"""The analysis commands behind ``kdbench cka``, ``kdbench rank-students`` and ``kdbench plot``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tabulate import tabulate

from kdbench.errors import KdbenchError


def _plan(grid_or_run: Path):
    """The plan of a grid file, or of the grid last run in a run directory (with that directory)."""
    from kdbench.config import load_grid
    from kdbench.runner import plan

    path = Path(grid_or_run)
    if path.is_dir():
        grid = path / "grid.yaml"
        if not grid.exists():
            raise KdbenchError(f"{path} is not a run directory (no grid.yaml); give a grid file or a run dir")
        p = plan(load_grid(grid), path)
    elif path.exists():
        p = plan(load_grid(path))
    else:
        raise KdbenchError(f"{path} does not exist; give a grid file or a run directory")
    run_dir = Path(p.run_dir)
    return p, (run_dir if run_dir.exists() else None)


def cka(grid_or_run: Path, pair: int, out: Path | None, probe: int, n_groups: int | None) -> list[Path]:
    """Compute and write the CKA maps of pair ``pair`` (0-based, grid order)."""
    from kdbench.analysis import cka as ck
    from kdbench.analysis.models import pair_models

    p, run_dir = _plan(grid_or_run)
    pairs = ck.pairs_of(p.cells)
    if not 0 <= pair < len(pairs):
        raise KdbenchError(f"--pair {pair} is out of range: the grid has pairs 0..{len(pairs) - 1}")
    cell = pairs[pair]
    pm = pair_models(cell, run_dir, probe)
    groups = n_groups or ck.ckakd_groups(p.cells)
    after = ck.distilled_state(run_dir, p.cells, ck._pair_key(cell))
    maps = ck.compute(pm, groups, after)
    out = Path(out) if out else (run_dir or Path(".")) / "analysis"
    stem = f"cka_pair{pair}"
    ck.write_csv(maps, out / f"{stem}.csv")
    ck.heatmap(maps, out / f"{stem}.png")
    return [out / f"{stem}.png", out / f"{stem}.csv"]


def rank_students(grid_or_run: Path, probe: int, method: str) -> str:
    """The ranking table (and correlations with measured top-1 when the run has results)."""
    from kdbench.analysis import rank
    from kdbench.analysis.cka import pairs_of
    from kdbench.analysis.models import pair_models

    p, run_dir = _plan(grid_or_run)
    scores = []
    for cell in pairs_of(p.cells):
        pm = pair_models(cell, run_dir, probe)
        scores.append(
            rank.StudentScore(pm.label, cell["student"]["label"], rank.score_pair(pm), pm.teacher_trained)
        )
    measured: dict[str, float] = {}
    if run_dir is not None and (run_dir / "results.sqlite").exists():
        from kdbench.store import Store

        store = Store.open_existing(run_dir / "results.sqlite")
        try:
            measured = rank.measured_top1(store.cells(), method)
        finally:
            store.close()
    rows = []
    for s in sorted(scores, key=lambda s: -s.scores["diswot"]):
        rows.append(
            [s.label, *(f"{s.scores[k]:.4f}" for k in rank.SCORES)]
            + [f"{measured[s.label]:.2f}" if s.label in measured else "–"]
            + ["" if s.teacher_trained else "teacher untrained"]
        )
    lines = [
        tabulate(
            rows,
            headers=["teacher→student", *(f"{k} ↑" for k in rank.SCORES), f"{method} top-1", "note"],
            tablefmt="github",
        )
    ]
    corr = rank.correlations(scores, measured)
    if corr:
        lines += [
            "",
            tabulate(
                [
                    [
                        k,
                        f"{v['kendall_tau']:+.3f} (p={v['kendall_p']:.2f})",
                        f"{v['spearman_rho']:+.3f} (p={v['spearman_p']:.2f})",
                        v["n"],
                    ]
                    for k, v in corr.items()
                ],
                headers=["score", "Kendall τ", "Spearman ρ", "n"],
                tablefmt="github",
            ),
        ]
    elif measured:
        lines.append(f"\n(correlations need ≥ 3 students with {method} results; found {len(measured)})")
    return "\n".join(lines)


def plot(run_dir: Path, out: Path | None, metric: str) -> list[Path]:
    from kdbench.analysis import plots
    from kdbench.report import open_run

    run = open_run(Path(run_dir))
    out = Path(out) if out else Path(run_dir) / "plots"
    made: list[Path] = [plots.leaderboard(run, out, metric)]
    try:
        made.append(plots.curves(run, out, metric))
    except KdbenchError as e:
        if not made:
            raise
        made_note: Any = e
        print(f"note: {made_note}")
    return made
