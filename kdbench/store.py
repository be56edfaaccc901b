"""The results store: one SQLite file per run directory (stdlib sqlite3, WAL mode).

Only the driver process writes it. Workers leave ``cells/<id>/result.json`` (atomic) and the
driver imports those files, so a crash between the two loses nothing: the next run imports
whatever result files exist before deciding what is left to do.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,              -- pending | done | failed
    config TEXT NOT NULL,              -- the cell dict (JSON)
    metrics TEXT,                      -- JSON
    env TEXT,                          -- JSON: versions, git sha, host, device
    error TEXT,
    wall_s REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE IF NOT EXISTS meta (      -- facts about the run directory (e.g. threads)
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS teachers (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    metrics TEXT,
    env TEXT,
    wall_s REAL,
    updated REAL NOT NULL DEFAULT (strftime('%s','now'))
);
"""


def _plain(obj: Any) -> Any:
    """A record (kdbench.cells: Cell, TeacherSpec, CellResult) as its JSON dict; anything else as is."""
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else obj


def _json_default(obj: Any) -> Any:
    plain = _plain(obj)
    return str(obj) if plain is obj else plain


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file in the same directory + os.replace (never half-written).

    A full disk or an unwritable directory raises ``DiskError`` naming the file; the temp
    file is removed.
    """
    from kdbench.artifacts import write_bytes_atomic

    data = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    write_bytes_atomic(Path(path), data.encode())


class Store:
    """Thin, transactional access to ``results.sqlite``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    @classmethod
    def open_existing(cls, path: Path) -> Store:
        """Open a store that must exist; read-only (writing nothing) when its directory is."""
        path = Path(path)
        if not path.exists():
            from kdbench.errors import KdbenchError

            raise KdbenchError(f"no results store at {path}; run `kdbench run GRID` first")
        if not os.access(path.parent, os.W_OK) or not os.access(path, os.W_OK):
            return cls.read_only(path)
        return cls(path)

    @classmethod
    def read_only(cls, path: Path, immutable: bool | None = None) -> Store:
        """Open for reading only. ``immutable`` (default: when the directory is not writable)
        also skips SQLite's WAL index files, so nothing at all is written (an archived run)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        if immutable is None:
            immutable = not os.access(self.path.parent, os.W_OK)
        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{flags}", uri=True, timeout=30)
        return self

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.db:
            yield self.db

    def close(self) -> None:
        self.db.close()

    # ---- cells
    def add_pending(self, cells: list[dict]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO cells (id, status, config) VALUES (?, 'pending', ?)",
                [(c["id"], json.dumps(_plain(c), sort_keys=True)) for c in cells],
            )

    def record(self, result: dict) -> None:
        """Insert or replace a cell's outcome from its result.json content."""
        result = _plain(result)
        cell = _plain(result["cell"])
        with self.transaction() as db:
            db.execute(
                """INSERT INTO cells (id, status, config, metrics, env, error, wall_s, attempts)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET status=excluded.status, config=excluded.config,
                     metrics=excluded.metrics, env=excluded.env, error=excluded.error,
                     wall_s=excluded.wall_s, attempts=excluded.attempts,
                     updated=strftime('%s','now')""",
                (
                    cell["id"],
                    result["status"],
                    json.dumps(cell, sort_keys=True),
                    json.dumps(result.get("metrics")),
                    json.dumps(result.get("env")),
                    result.get("error"),
                    result.get("wall_s"),
                    result.get("attempt", 1),
                ),
            )

    def record_teacher(self, spec: dict, metrics: dict, env: dict, wall_s: float) -> None:
        spec = _plain(spec)
        with self.transaction() as db:
            db.execute(
                """INSERT INTO teachers (id, config, metrics, env, wall_s) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET metrics=excluded.metrics, env=excluded.env,
                     wall_s=excluded.wall_s, updated=strftime('%s','now')""",
                (spec["id"], json.dumps(spec, sort_keys=True), json.dumps(metrics), json.dumps(env), wall_s),
            )

    def status(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, status FROM cells"))

    def cells(self, status: str | None = None) -> list[dict]:
        q = "SELECT id, status, config, metrics, env, error, wall_s, attempts FROM cells"
        rows = self.db.execute(q + (" WHERE status = ?" if status else ""), (status,) if status else ())
        out = []
        for r in rows:
            out.append(
                {
                    "id": r[0],
                    "status": r[1],
                    "config": json.loads(r[2]),
                    "metrics": json.loads(r[3]) if r[3] else None,
                    "env": json.loads(r[4]) if r[4] else None,
                    "error": r[5],
                    "wall_s": r[6],
                    "attempts": r[7],
                }
            )
        return out

    # ---- run-level facts
    def get_meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a store older than the meta table, opened read-only
            return None
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    def teachers(self) -> list[dict]:
        rows = self.db.execute("SELECT id, config, metrics, wall_s FROM teachers")
        return [
            {
                "id": r[0],
                "config": json.loads(r[1]),
                "metrics": json.loads(r[2]) if r[2] else None,
                "wall_s": r[3],
            }
            for r in rows
        ]
