"""The activity log's record of one request, and what the proxy's hot path does with it: fields filled from
clocks and references it holds anyway, and for a stream, per chunk, a few byte checks (StreamTap). The rest of
the work happens on the log's writer thread (activity.py)."""

from __future__ import annotations

import json
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from . import answer
from .activity_store import COLUMNS, public

Capture = Literal["off", "errors", "all"]
# Scope keys between a replay (web/ops/activity.py) and the API's front door: the record replayed, the new id.
REPLAY_OF = "llama_supervisor.replay_of"
RECORD_ID = "llama_supervisor.activity_id"
TAIL_MAX = 8  # chunks kept after the one with a stream's timings
_COLUMNS_OF = operator.attrgetter(*COLUMNS)  # a Record's row, in one call
_NOTES = COLUMNS.index("notes")


class Log(Protocol):
    """What a record needs of its log (activity.Activity)."""

    def finish(self, rec: Record) -> None: ...

    def keep_raw(self, rec: Record, size: int, per_limit: int | None = None) -> bool: ...


@dataclass(slots=True, eq=False)
class Record:
    """One request. Fields named as in the table (activity_store.COLUMNS); the rest is hand-over material."""

    id: int
    at: float  # Unix seconds
    model: str
    route: str
    method: str = "POST"
    client: str | None = None
    replay_of: int | None = None
    status: int = 499  # what the client got (499: it left first)
    stream: bool = False
    queue_ms: float = 0.0
    load_ms: float = 0.0
    ttft_ms: float | None = None
    duration_ms: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tps: float | None = None
    decode_tps: float | None = None
    prompt_ms: float | None = None
    decode_ms: float | None = None
    finish_reason: str | None = None
    images_in: int = 0
    images_downscaled: int = 0
    context_trimmed: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # what the supervisor did: waited, retried, trimmed...
    captured: bool = False
    # hand-over to the writer thread (not stored as such)
    t0: float = 0.0  # perf_counter at the start
    capture: Capture = "off"
    capture_media: bool = False
    answer: bytes | None = None  # a whole answer, or a stream's last chunks (those with timings)
    request_body: bytes | None = None  # as sent upstream, when captured
    chunks: list[bytes] | None = None  # a stream's raw chunks, when captured
    chunks_complete: bool = True
    pending: int = 0  # bytes held for the writer
    owner: Log | None = None

    def note(self, text: str) -> None:
        self.notes.append(text)

    def finish(self) -> None:
        """Hand the record to its log (to be written)."""
        assert self.owner is not None
        self.owner.finish(self)

    def hold(self, size: int) -> bool:
        """May this many more bytes of capture material wait for the writer (see Activity.keep_raw)?"""
        assert self.owner is not None
        return self.owner.keep_raw(self, size)

    def row(self) -> tuple[Any, ...]:
        values = _COLUMNS_OF(self)
        return (*values[:_NOTES], json.dumps(self.notes) if self.notes else "[]", *values[_NOTES + 1:])

    def as_dict(self) -> dict[str, Any]:
        """As /activity shows it, before (or without) its row on disk."""
        return {**public({c: getattr(self, c) for c in COLUMNS}), "on_disk": False}


class StreamTap:
    """What the activity log takes from a stream as it passes, per chunk a few byte searches: the time of the
    first generated token, and references to the last chunks (those with llama-server's timings; nothing is
    parsed here), plus the raw chunks when the request is captured."""

    __slots__ = ("first", "keep", "log", "prev", "rec", "tail")

    def __init__(self, rec: Record) -> None:
        assert rec.owner is not None
        self.log: Log = rec.owner
        self.rec = rec
        self.first = False
        self.prev = b""
        self.tail: list[bytes] | None = None
        self.keep = rec.capture != "off"
        if self.keep:
            rec.chunks = []

    def feed(self, chunk: bytes, timings: bool) -> None:
        """`timings`: the chunk holds `"timings"` (the relay looks anyway, for its token counters)."""
        if self.tail is not None:
            if len(self.tail) < TAIL_MAX:  # after the timings: `[DONE]`, little else
                self.tail.append(chunk)
        elif timings:
            self.tail = [self.prev, chunk]  # an event cut in two: its start is in the chunk before
        if not self.first and answer.has_token(chunk):
            self.first = True
            self.rec.ttft_ms = (time.perf_counter() - self.rec.t0) * 1000
        self.prev = chunk
        if self.keep:
            raw = self.rec.chunks
            if raw is not None and self.log.keep_raw(self.rec, len(chunk), answer.RAW_PER_TEXT):
                raw.append(chunk)
            else:
                self.keep, self.rec.chunks_complete = False, False

    def done(self) -> None:
        self.rec.stream = True
        self.rec.answer = b"".join(self.tail) if self.tail is not None else self.prev
