"""The results store: one SQLite file per run directory (stdlib sqlite3, WAL mode).

Only the driver process writes it. Workers leave ``cells/<id>/result.json`` (atomic) and the
driver imports those files, so a crash between the two loses nothing: the next run imports
whatever result files exist before deciding what is left to do.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
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
CREATE TABLE IF NOT EXISTS teachers (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    metrics TEXT,
    env TEXT,
    wall_s REAL,
    updated REAL NOT NULL DEFAULT (strftime('%s','now'))
);
"""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file in the same directory + os.replace (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        if not Path(path).exists():
            from kdbench.errors import KdbenchError

            raise KdbenchError(f"no results store at {path}; run `kdbench run GRID` first")
        return cls(path)

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
                [(c["id"], json.dumps(c, sort_keys=True)) for c in cells],
            )

    def record(self, result: dict) -> None:
        """Insert or replace a cell's outcome from its result.json content."""
        cell = result["cell"]
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
