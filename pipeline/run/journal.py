"""The request journal: every answer received is committed here before a stage relies on it.

sqlite3 in WAL mode. A committed transaction survives the process being killed (SIGKILL, Ctrl-C, a crash);
``synchronous=NORMAL`` trades durability across a power loss of the last transactions for speed, which is
the standard WAL setting. Keys are deterministic (model identity + request), so a re-run finds every answer it
already paid for. Failures are kept in their own table, never as results, and are retried on the next run.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.models.base import Completion, Failure

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    result TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    runs INTEGER NOT NULL,
    updated REAL NOT NULL
);
"""


@dataclass
class Entry:
    key: str
    request_json: str
    result: Completion | Failure
    cost_usd: float = 0.0


@dataclass
class Cached:
    completion: Completion
    cost_usd: float


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)

    def get_many(self, keys: Sequence[str]) -> dict[str, Cached]:
        out: dict[str, Cached] = {}
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 500):
            chunk = uniq[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for key, result, cost in self.conn.execute(
                f"SELECT key, result, cost_usd FROM results WHERE key IN ({marks})", chunk
            ):
                out[key] = Cached(Completion.model_validate_json(result), cost)
        return out

    def commit(self, stage: str, model: str, entries: Iterable[Entry]) -> None:
        """Commit a group of results in one transaction: successes as results, failures apart."""
        now = time.time()
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for e in entries:
                r = e.result
                if isinstance(r, Completion):
                    cur.execute(
                        "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                        (e.key, stage, model, e.request_json, r.model_dump_json(), r.usage.prompt_tokens,
                         r.usage.completion_tokens, e.cost_usd, now),
                    )
                    cur.execute("DELETE FROM failures WHERE key = ?", (e.key,))
                else:
                    cur.execute(
                        "INSERT INTO failures VALUES (?,?,?,?,?,?,1,?) ON CONFLICT(key) DO UPDATE SET "
                        "kind=excluded.kind, error=excluded.error, attempts=failures.attempts+excluded.attempts, "
                        "runs=failures.runs+1, updated=excluded.updated",
                        (e.key, stage, model, r.kind, r.error, r.attempts, now),
                    )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def open_failures(self, stage: str | None = None) -> list[dict]:
        q = "SELECT key, stage, model, kind, error, attempts, runs FROM failures"
        rows = self.conn.execute(q + (" WHERE stage = ?" if stage else ""), (stage,) if stage else ()).fetchall()
        cols = ["key", "stage", "model", "kind", "error", "attempts", "runs"]
        return [dict(zip(cols, r)) for r in rows]

    def count_results(self, stage: str | None = None) -> int:
        q = "SELECT COUNT(*) FROM results" + (" WHERE stage = ?" if stage else "")
        return self.conn.execute(q, (stage,) if stage else ()).fetchone()[0]

    def close(self) -> None:
        self.conn.close()
