"""Plugin discovery through Python entry points.

Scanning reads distribution metadata only (``importlib.metadata``); nothing is imported
until a plugin is used. A plugin that fails to import is reported with the distribution
that ships it. Two distributions claiming one name is an error naming both, raised only
where that name is used (listing shows both claimants; other plugins keep working).
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from kdbench.errors import PluginError

#: plugin kind (CLI / grid word) -> entry-point group
GROUPS: dict[str, str] = {
    "models": "kdbench.models",
    "teachers": "kdbench.teachers",
    "losses": "kdbench.losses",
    "augmenters": "kdbench.augmenters",
    "datasets": "kdbench.datasets",
    "executors": "kdbench.executors",
    "loggers": "kdbench.loggers",
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


#: plugin kind -> the word for one of them in messages
SINGULAR: dict[str, str] = {
    "models": "model",
    "teachers": "teacher",
    "losses": "loss",
    "augmenters": "augmenter",
    "datasets": "dataset",
    "executors": "executor",
    "loggers": "logger",
}


def singular(kind: str) -> str:
    """``"losses"`` -> ``"loss"`` (the word for one plugin of a kind)."""
    return SINGULAR.get(kind, kind)


@dataclass(frozen=True)
class _Scan:
    plugins: dict[str, dict[str, PluginInfo]]
    #: kind -> name -> every distribution claiming it (only names claimed more than once)
    conflicts: dict[str, dict[str, list[PluginInfo]]]


@lru_cache(maxsize=1)
def _scan() -> _Scan:
    found: dict[str, dict[str, PluginInfo]] = {k: {} for k in GROUPS}
    conflicts: dict[str, dict[str, list[PluginInfo]]] = {k: {} for k in GROUPS}
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
            if other is not None:
                conflicts[kind].setdefault(ep.name, [other]).append(info)
                continue
            found[kind][ep.name] = info
    return _Scan(found, conflicts)


def scan() -> dict[str, dict[str, PluginInfo]]:
    """All plugins by kind and name (the first claimant of a contested name); one cached scan."""
    return _scan().plugins


def claimants(kind: str, name: str) -> list[PluginInfo]:
    """Every distribution registering ``name`` (more than one: the name is contested)."""
    contested = _scan().conflicts[_check_kind(kind)].get(name)
    if contested:
        return list(contested)
    p = scan()[kind].get(name)
    return [p] if p else []


def conflict_message(kind: str, name: str) -> str | None:
    """The error for a name two distributions claim, or None when it is not contested."""
    contested = _scan().conflicts[_check_kind(kind)].get(name)
    if not contested:
        return None
    who = " and ".join(f"{p.dist} {p.version} ({p.value})" for p in contested)
    return (
        f"{singular(kind)} plugin {name!r} is registered by {len(contested)} distributions: {who}; "
        f"uninstall all but one of them"
    )


def clear_cache() -> None:
    """Forget the scan (after installing a plugin in the same process, e.g. in tests)."""
    _scan.cache_clear()
    _load.cache_clear()


@cache
def paper(value: str) -> str | None:
    """The reference a plugin's docstring cites, read from its source without importing it:
    the first parenthesis with a year in the first paragraph of the object's docstring, else of
    its module's (``kdbench.methods.dist:DIST`` -> ``"Huang et al., NeurIPS 2022"``). None when
    there is none (or the source cannot be read)."""
    import ast
    import importlib.util
    import re

    module, _, attr = value.partition(":")
    top, *subs = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name is located, not imported
        if spec is None:
            return None
        origin, dirs = spec.origin, list(spec.submodule_search_locations or [])
        for part in subs:  # walk the package directories instead of importing the packages
            found = [Path(d) / part for d in dirs if (Path(d) / part / "__init__.py").exists()]
            if found:
                origin, dirs = str(found[0] / "__init__.py"), [str(found[0])]
                continue
            files = [Path(d) / f"{part}.py" for d in dirs if (Path(d) / f"{part}.py").exists()]
            if not files:
                return None
            origin, dirs = str(files[0]), []
        if not origin or not origin.endswith(".py"):
            return None
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    except (ImportError, ValueError, OSError, SyntaxError):
        return None
    docs = [ast.get_docstring(tree)]
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == attr.split(".")[0]:
            docs.insert(0, ast.get_docstring(node))
    for doc in docs:
        first = " ".join((doc or "").split("\n\n")[0].split())
        m = re.search(r"\(([^()]*?\b(?:19|20)\d\d)\b", first)
        if m:
            return m.group(1).strip()
    return None


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
    clash = conflict_message(kind, name)
    if clash:
        raise PluginError(clash)
    if name not in plugins:
        raise PluginError(
            f"unknown {singular(kind)} {name!r}{did_you_mean(name, list(plugins))}; "
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
            f"{singular(kind)} plugin {name!r} from {p.dist} {p.version} failed to load ({p.value}): "
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
