"""The activity log on disk: one SQLite file in the state directory (standard library sqlite3, WAL).

Blocking by nature: writes run on the activity log's own writer thread, reads in a worker thread
(asyncio.to_thread), each with its own connection. Every failure is an sqlite3.Error or OSError for the
caller to count; nothing here decides whether a request goes on (it always does).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
# The columns of a record, in table order (the Record's fields of the same names; `notes` is JSON text).
COLUMNS = ("id", "at", "model", "route", "method", "status", "stream", "client", "queue_ms", "load_ms", "ttft_ms",
           "duration_ms", "prompt_tokens", "cached_tokens", "completion_tokens", "prompt_tps", "decode_tps",
           "prompt_ms", "decode_ms", "finish_reason", "images_in", "images_downscaled", "context_trimmed", "error",
           "replay_of", "notes", "captured")
_TYPES = {"id": "INTEGER PRIMARY KEY", "at": "REAL NOT NULL", "status": "INTEGER", "stream": "INTEGER",
          "prompt_tokens": "INTEGER", "cached_tokens": "INTEGER", "completion_tokens": "INTEGER",
          "images_in": "INTEGER", "images_downscaled": "INTEGER", "replay_of": "INTEGER", "captured": "INTEGER"}
CAPTURE_COLUMNS = ("id", "request", "response", "text", "truncated", "images_hashed")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS activity ("
    + ", ".join(f"{c} {_TYPES.get(c, 'REAL' if c.endswith(('_ms', '_tps')) else 'TEXT')}" for c in COLUMNS) + ")",
    "CREATE INDEX IF NOT EXISTS activity_at ON activity(at)",
    "CREATE TABLE IF NOT EXISTS capture (id INTEGER PRIMARY KEY, request TEXT, response TEXT, text TEXT, "
    "truncated INTEGER, images_hashed INTEGER)",
)
_INSERT = f"INSERT OR REPLACE INTO activity ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_INSERT_CAPTURE = (f"INSERT OR REPLACE INTO capture ({', '.join(CAPTURE_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(CAPTURE_COLUMNS))})")
# A writer waits this long for another process's lock, then the batch is dropped (and counted).
BUSY_MS = 1000
STATUS_CLASSES = {"1xx": (100, 199), "2xx": (200, 299), "3xx": (300, 399), "4xx": (400, 499), "5xx": (500, 599),
                  "error": (400, 999)}


class SchemaError(sqlite3.DatabaseError):
    """The file was written by a newer version of the supervisor: left alone."""


@dataclass(frozen=True)
class Filters:
    """What a reader asks for: newest first, at most `limit`, ids below `before`."""

    limit: int = 100
    before: int | None = None
    model: str | None = None
    status: str | None = None  # a class (2xx, 4xx, 5xx, error) or one code
    min_duration_ms: float | None = None

    def status_range(self) -> tuple[int, int] | None:
        if self.status is None:
            return None
        if self.status in STATUS_CLASSES:
            return STATUS_CLASSES[self.status]
        code = int(self.status)  # checked by the route
        return code, code

    def matches(self, rid: int, model: str, status: int, duration_ms: float | None) -> bool:
        """The same test as sql(), for records still in memory."""
        rng = self.status_range()
        return ((self.before is None or rid < self.before) and (self.model is None or model == self.model)
                and (rng is None or rng[0] <= status <= rng[1])
                and (self.min_duration_ms is None or (duration_ms or 0) >= self.min_duration_ms))

    def sql(self) -> tuple[str, list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if self.before is not None:
            where.append("id < ?")
            args.append(self.before)
        if self.model is not None:
            where.append("model = ?")
            args.append(self.model)
        if (rng := self.status_range()) is not None:
            where.append("status BETWEEN ? AND ?")
            args.extend(rng)
        if self.min_duration_ms is not None:
            where.append("duration_ms >= ?")
            args.append(self.min_duration_ms)
        return (" WHERE " + " AND ".join(where) if where else ""), args


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as /activity shows it: ISO time, booleans, images and notes as objects."""
    d = dict(row)
    d["on_disk"] = True
    d["at"] = datetime.fromtimestamp(d["at"], UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    d["stream"] = bool(d["stream"])
    d["captured"] = bool(d.get("captured"))
    d["images"] = {"in": d.pop("images_in") or 0, "downscaled": d.pop("images_downscaled") or 0}
    notes = d.get("notes")
    d["notes"] = json.loads(notes) if isinstance(notes, str) else list(notes or [])
    for k in ("queue_ms", "load_ms", "ttft_ms", "duration_ms", "prompt_ms", "decode_ms"):
        if d.get(k) is not None:
            d[k] = round(d[k], 2)
    for k in ("prompt_tps", "decode_tps"):
        if d.get(k) is not None:
            d[k] = round(d[k], 1)
    return d


def percentiles(xs: list[float]) -> dict[str, float | None]:
    xs = sorted(xs)
    if not xs:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{p}": round(xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))], 2) for p in (50, 95, 99)}


def by_model(rows: Iterable[tuple[str, int, float | None, float | None]]) -> dict[str, Any]:
    """(model, status, ttft_ms, decode_tps) rows → per model: count, errors, p50/p95/p99 of TTFT and tokens/s."""
    per: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for model, status, ttft, tps in rows:
        per.setdefault(model, []).append((status, ttft, tps))
    return {model: {"count": len(xs), "errors": sum(1 for s, _, _ in xs if s >= 400),
                    "ttft_ms": percentiles([t for _, t, _ in xs if t is not None]),
                    "decode_tps": percentiles([v for _, _, v in xs if v is not None])}
            for model, xs in sorted(per.items())}


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


class Store:
    """One database file. `open`, `write` and `prune` belong to the writer thread; `read_*` to readers."""

    def __init__(self, path: Path, max_rows: int, max_age_s: float) -> None:
        self.path, self.max_rows, self.max_age_s = path, max_rows, max_age_s
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._w is not None

    def open(self) -> int:
        """Create or open the file (WAL); returns the highest id kept (0 for none)."""
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaError(f"{self.path}: written by a newer supervisor (schema {version}, "
                                  f"this one knows {SCHEMA_VERSION}): move it away to start a new log")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a power cut loses the last batch, never the file
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM activity").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._w = conn
        return int(last)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def close_reader(self) -> None:
        with self._read_lock:
            if self._r is not None:
                self._r.close()
                self._r = None

    def write(self, rows: Sequence[Sequence[Any]], captures: Iterable[Sequence[Any]]) -> None:
        """One transaction for the whole batch."""
        assert self._w is not None
        conn = self._w
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, rows)
            conn.executemany(_INSERT_CAPTURE, captures)

    def prune(self, now: float) -> int:
        """Retention: rows older than max_age_s, then the oldest beyond max_rows (and their captures)."""
        assert self._w is not None
        conn = self._w
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            n = conn.execute("DELETE FROM activity WHERE at < ?", (now - self.max_age_s,)).rowcount
            n += conn.execute("DELETE FROM activity WHERE id <= (SELECT id FROM activity ORDER BY id DESC "
                              "LIMIT 1 OFFSET ?)", (self.max_rows,)).rowcount
            if n:
                conn.execute("DELETE FROM capture WHERE id < COALESCE((SELECT MIN(id) FROM activity), 1 << 62)")
        return n

    # ---- reads (any thread but the event loop's; one reader at a time) ----------------------------------

    def _reader(self) -> sqlite3.Connection:
        if self._r is None:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: not created yet")
            self._r = _connect(self.path)
        return self._r

    def read_list(self, f: Filters) -> list[dict[str, Any]]:
        where, args = f.sql()
        with self._read_lock:
            rows = self._reader().execute(f"SELECT * FROM activity{where} ORDER BY id DESC LIMIT ?",
                                          [*args, f.limit]).fetchall()
        return [dict(r) for r in rows]

    def read_one(self, rid: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the record, its capture), each None when not kept."""
        with self._read_lock:
            conn = self._reader()
            row = conn.execute("SELECT * FROM activity WHERE id = ?", (rid,)).fetchone()
            cap = conn.execute("SELECT * FROM capture WHERE id = ?", (rid,)).fetchone()
        return (dict(row) if row else None), (dict(cap) if cap else None)

    def read_window(self, since: float) -> list[tuple[str, int, float | None, float | None]]:
        """(model, status, ttft_ms, decode_tps) of every record since then, for the percentiles."""
        with self._read_lock:
            return [tuple(r) for r in self._reader().execute(
                "SELECT model, status, ttft_ms, decode_tps FROM activity WHERE at >= ?", (since,))]

    def read_count(self) -> int:
        with self._read_lock:
            return int(self._reader().execute("SELECT COUNT(*) FROM activity").fetchone()[0])
