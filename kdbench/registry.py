"""Plugin discovery through Python entry points.

Scanning reads distribution metadata only (``importlib.metadata``); nothing is imported
until a plugin is used. A plugin that fails to import is reported with the distribution
that ships it; two distributions claiming one name in one group is an error naming both.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from kdbench.errors import PluginError

#: plugin kind (CLI / grid word) -> entry-point group
GROUPS: dict[str, str] = {
    "models": "kdbench.models",
    "teachers": "kdbench.teachers",
    "losses": "kdbench.losses",
    "augmenters": "kdbench.augmenters",
    "datasets": "kdbench.datasets",
}


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, known from metadata alone."""

    kind: str
    name: str
    value: str  # "module:object"
    dist: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "value": self.value,
            "dist": self.dist,
            "version": self.version,
        }


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


@lru_cache(maxsize=1)
def scan() -> dict[str, dict[str, PluginInfo]]:
    """All plugins by kind and name; the one cached scan in the process."""
    found: dict[str, dict[str, PluginInfo]] = {k: {} for k in GROUPS}
    conflicts: list[str] = []
    seen_dists: set[tuple[str, str, str]] = set()
    for kind, group in GROUPS.items():
        for ep in md.entry_points(group=group):
            dist, version = _dist_of(ep)
            # the same distribution visible twice on sys.path (editable + build dir) is not a clash
            key = (group, ep.name, dist)
            if key in seen_dists:
                continue
            seen_dists.add(key)
            info = PluginInfo(kind, ep.name, ep.value, dist, version)
            other = found[kind].get(ep.name)
            if other is not None and other.dist != dist:
                conflicts.append(
                    f"{kind} plugin {ep.name!r} is registered by both {other.dist} {other.version} "
                    f"({other.value}) and {dist} {version} ({ep.value}); uninstall one of them"
                )
                continue
            found[kind][ep.name] = info
    if conflicts:
        raise PluginError("\n".join(conflicts))
    return found


def clear_cache() -> None:
    """Forget the scan (after installing a plugin in the same process, e.g. in tests)."""
    scan.cache_clear()
    _load.cache_clear()


def kinds() -> list[str]:
    return list(GROUPS)


def names(kind: str) -> list[str]:
    return sorted(scan()[_check_kind(kind)])


def _check_kind(kind: str) -> str:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}; choose one of: {', '.join(GROUPS)}")
    return kind


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def info(kind: str, name: str) -> PluginInfo:
    """Metadata of one plugin; a clear error with suggestions when it does not exist."""
    plugins = scan()[_check_kind(kind)]
    if name not in plugins:
        singular = kind[:-1]
        raise PluginError(
            f"unknown {singular} {name!r}{did_you_mean(name, list(plugins))}; "
            f"`kdbench list {kind}` shows the {len(plugins)} available"
        )
    return plugins[name]


@cache
def _load(kind: str, name: str) -> Any:
    p = info(kind, name)
    module, _, attr = p.value.partition(":")
    try:
        obj = __import__(module, fromlist=["_"])
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # a broken plugin must not take the others down
        raise PluginError(
            f"{kind[:-1]} plugin {name!r} from {p.dist} {p.version} failed to load ({p.value}): "
            f"{type(e).__name__}: {e}"
        ) from e
    return obj


def load(kind: str, name: str) -> Any:
    """Import and return the plugin object (class or factory)."""
    return _load(_check_kind(kind), name)


def versions(refs: list[tuple[str, str]]) -> dict[str, str]:
    """``{"kind:name": "dist==version"}`` for the plugins a cell uses (part of its hash)."""
    out = {}
    for kind, name in refs:
        p = info(kind, name)
        out[f"{kind}:{name}"] = f"{p.dist}=={p.version}"
    return out
