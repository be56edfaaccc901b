"""Significance of a method against the baseline over seeds, corrected across one table.

Each (method, column) is compared with the baseline in that column by a t-test over seeds:
paired on the seeds both sides share when at least three are shared (a missing seed on one
side drops that seed, it does not turn the test into Welch's), Welch's t-test when fewer
are shared and both sides have at least three. A difference with no variance has no
t statistic: identical values give p = 1; a constant non-zero difference gives no p at all
("undefined", shown as such and never counted as significant).

The p-values of one table are adjusted with Holm–Bonferroni (Holm 1979): sort the m p-values,
``p_adj(i) = max_{j ≤ i} min(1, (m − j + 1)·p(j))``; a difference is significant when its
adjusted p is below :data:`ALPHA`. Undefined and untested comparisons do not count in m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdbench.errors import KdbenchError

ALPHA = 0.05
MIN_SEEDS = 3
PAIRED = "paired t-test"
WELCH = "Welch's t-test"
TOO_SMALL = "n too small"


@dataclass
class Comparison:
    """A method against the baseline row in one column."""

    test: str  # PAIRED | WELCH | TOO_SMALL
    p: float | None = None  # None: not tested, or undefined (see ``undefined``)
    diff: float | None = None
    n: int = 0  # seeds used: pairs for the paired test, both sides' values for Welch
    undefined: bool = False  # zero variance with a non-zero difference: no t statistic
    p_adjusted: float | None = None  # Holm–Bonferroni over the table; set by :func:`holm`

    @property
    def significant(self) -> bool | None:
        if self.p is None:
            return None
        return (self.p if self.p_adjusted is None else self.p_adjusted) < ALPHA


def _by_seed(values: list[float], seeds: list[Any]) -> dict[str, float] | None:
    """seed -> value, or None when a seed repeats (pairing would be ambiguous)."""
    keys = [str(s) for s in seeds]
    return dict(zip(keys, values, strict=True)) if len(set(keys)) == len(keys) else None


def _zero_variance(diffs: list[float]) -> bool:
    return max(diffs) - min(diffs) < 1e-12


def compare_values(
    base: list[float], base_seeds: list[Any], other: list[float], other_seeds: list[Any]
) -> Comparison:
    """``other`` against ``base`` over seeds (see the module docstring for the rule)."""
    a, b = _by_seed(base, base_seeds), _by_seed(other, other_seeds)
    shared = [s for s in b if s in a] if a is not None and b is not None else []
    if len(shared) >= MIN_SEEDS:
        x, y = [a[s] for s in shared], [b[s] for s in shared]
        d = [v - u for u, v in zip(x, y, strict=True)]
        diff = sum(d) / len(d)
        if _zero_variance(d):
            return _degenerate(PAIRED, diff, len(d))
        return Comparison(PAIRED, float(_scipy_stats().ttest_rel(y, x).pvalue), diff, len(d))
    if len(base) < MIN_SEEDS or len(other) < MIN_SEEDS:
        return Comparison(TOO_SMALL)
    diff = sum(other) / len(other) - sum(base) / len(base)
    if _zero_variance(base) and _zero_variance(other):
        return _degenerate(WELCH, diff, len(base) + len(other))
    p = _scipy_stats().ttest_ind(other, base, equal_var=False).pvalue
    return Comparison(WELCH, float(p), diff, len(base) + len(other))


def _degenerate(test: str, diff: float, n: int) -> Comparison:
    """No variance: identical sides are not different (p = 1); a constant shift has no p."""
    if abs(diff) < 1e-12:
        return Comparison(test, 1.0, diff, n)
    return Comparison(test, None, diff, n, undefined=True)


def holm(comparisons: list[Comparison]) -> int:
    """Set ``p_adjusted`` (Holm–Bonferroni) on every tested comparison; returns their number m."""
    tested = sorted((c for c in comparisons if c.p is not None), key=lambda c: c.p)
    m, running = len(tested), 0.0
    for i, c in enumerate(tested):
        running = max(running, min(1.0, (m - i) * c.p))
        c.p_adjusted = running
    return m


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        raise KdbenchError("--baseline needs scipy: pip install 'kdbench[stats]'") from None
    return stats
