"""The choices of ``kdbench report``'s options, importable without torch (shell completion reads them)."""

from __future__ import annotations

#: report kind -> module holding ``build(run: RunData, args: ReportArgs) -> Report``
KINDS: dict[str, str] = {
    "leaderboard": "kdbench.reports.leaderboard",
    "groups": "kdbench.reports.groups",
    "shift": "kdbench.reports.shift",
    "corruptions": "kdbench.reports.corruptions",
    "status": "kdbench.status",
}
FORMATS = ("github", "latex", "csv", "json", "html")
SELECTS = ("last", "best_val", "best_test")
SPREADS = ("std", "sem", "ci95")
