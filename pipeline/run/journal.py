"""The request journal: every answer received is committed here before a stage relies on it.

sqlite3 in WAL mode. A committed transaction survives the process being killed (SIGKILL, Ctrl-C, a crash);
``synchronous=NORMAL`` trades durability across a power loss of the last transactions for speed, which is
the standard WAL setting. Keys are deterministic (model identity + the request as sent), so a re-run finds
every answer it already paid for. Failures are kept in their own table, never as results: transient ones are
retried by the next run, permanent ones only with ``--retry-failed``. A small key/value table keeps state a
stage or backend must find again after a kill (where a late answer joined the pool, a batch id).
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
    updated REAL NOT NULL,
    permanent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS state (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""

FAILURE_COLUMNS = ["key", "stage", "model", "kind", "error", "attempts", "runs", "permanent"]


@dataclass
class Entry:
    key: str
    request_json: str
    result: Completion | Failure
    cost_usd: float = 0.0
    clears: tuple[str, ...] = ()  # other keys of the same request whose failures an answer settles


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
        cols = {r[1] for r in self.conn.execute("PRAGMA table_info(failures)")}
        if "permanent" not in cols:  # a journal written before failures had a kind
            self.conn.execute("ALTER TABLE failures ADD COLUMN permanent INTEGER NOT NULL DEFAULT 0")

    def _chunks(self, keys: Sequence[str]) -> Iterable[list[str]]:
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 500):
            yield uniq[i : i + 500]

    def get_many(self, keys: Sequence[str]) -> dict[str, Cached]:
        out: dict[str, Cached] = {}
        for chunk in self._chunks(keys):
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
                    for k in (e.key, *e.clears):
                        cur.execute("DELETE FROM failures WHERE key = ?", (k,))
                else:
                    cur.execute(
                        "INSERT INTO failures VALUES (?,?,?,?,?,?,1,?,?) ON CONFLICT(key) DO UPDATE SET "
                        "stage=excluded.stage, kind=excluded.kind, error=excluded.error, "
                        "attempts=failures.attempts+excluded.attempts, runs=failures.runs+1, "
                        "updated=excluded.updated, permanent=excluded.permanent",
                        (e.key, stage, model, r.kind, r.error, r.attempts, now, int(r.permanent)),
                    )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def failures_of(self, keys: Sequence[str]) -> dict[str, dict]:
        """The recorded failures among ``keys``."""
        out: dict[str, dict] = {}
        for chunk in self._chunks(keys):
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {', '.join(FAILURE_COLUMNS)} FROM failures WHERE key IN ({marks})", chunk
            ):
                rec = dict(zip(FAILURE_COLUMNS, row))
                rec["permanent"] = bool(rec["permanent"])
                out[rec["key"]] = rec
        return out

    def open_failures(self, stage: str | None = None) -> list[dict]:
        q = f"SELECT {', '.join(FAILURE_COLUMNS)} FROM failures"
        rows = self.conn.execute(q + (" WHERE stage = ?" if stage else ""), (stage,) if stage else ()).fetchall()
        return [dict(zip(FAILURE_COLUMNS, r)) | {"permanent": bool(r[-1])} for r in rows]

    # ---- key/value state -----------------------------------------------------------------------------
    def state_get(self, namespace: str, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM state WHERE namespace = ? AND key = ?", (namespace, key)).fetchone()
        return row[0] if row else None

    def state_put(self, namespace: str, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO state VALUES (?,?,?,?)", (namespace, key, value, time.time()))

    def state_delete(self, namespace: str, key: str) -> None:
        self.conn.execute("DELETE FROM state WHERE namespace = ? AND key = ?", (namespace, key))

    def state_items(self, namespace: str, prefix: str = "") -> list[tuple[str, str]]:
        return list(self.conn.execute(
            "SELECT key, value FROM state WHERE namespace = ? AND substr(key, 1, ?) = ? ORDER BY key",
            (namespace, len(prefix), prefix)))

    def close(self) -> None:
        self.conn.close()
