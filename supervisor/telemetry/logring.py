"""The log ring behind /logs/stream: the last lines of the supervisor and of the child, with ids.

One per process (a process has one log stream). Lines get increasing ids, so a client that reconnects
with Last-Event-ID gets exactly what it missed, or a `gap` note when the ring has moved past it. Memory
is bounded by the line count and a per-line cap, whatever the clients do: a stream reads the ring by id
and keeps no queue of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

LINES_MAX = 1000
LINE_CHARS_MAX = 2000
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


@dataclass(slots=True)  # not frozen (never changed after append): a frozen one costs 2 us to make, this 0.5
class Line:
    id: int
    t: float
    source: str  # "child" | "supervisor"
    level: str
    text: str
    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "t": round(self.t, 3), "source": self.source, "level": self.level,
                "text": self.text, "model": self.model}


class LogRing:
    def __init__(self, maxlen: int = LINES_MAX, max_chars: int = LINE_CHARS_MAX) -> None:
        self.lines: deque[Line] = deque(maxlen=maxlen)
        self.max_chars = max_chars
        self.last_id = 0
        self._lock = threading.Lock()  # structlog may log from worker threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._new = asyncio.Event()

    def append(self, source: str, level: str, text: str, model: str | None = None) -> None:
        self.extend(source, [(level, text)], model)

    def extend(self, source: str, lines: list[tuple[str, str]], model: str | None = None) -> None:
        """(level, text) lines from one source, under one lock and one clock reading."""
        now, cap = time.time(), self.max_chars
        with self._lock:
            for level, text in lines:
                if len(text) > cap:
                    text = text[:cap] + " …"
                self.last_id += 1
                self.lines.append(Line(self.last_id, now, source, level, text, model))
        loop = self._loop
        if loop is None:
            return  # nobody has ever waited: no one to wake
        if threading.get_ident() == self._loop_thread:
            self._wake()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        ev, self._new = self._new, asyncio.Event()
        ev.set()

    def after(self, last_id: int) -> tuple[list[Line], int]:
        """Lines with id > last_id, and how many of those the ring no longer has (the gap)."""
        with self._lock:
            lines = [ln for ln in self.lines if ln.id > last_id]
        first = lines[0].id if lines else self.last_id + 1
        return lines, max(0, first - last_id - 1)

    def tail(self, n: int) -> list[Line]:
        with self._lock:
            return list(self.lines)[-n:] if n > 0 else []

    async def wait(self, after_id: int, timeout: float) -> bool:
        """Until a line newer than after_id exists (True) or the timeout passes (False)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the first waiter, or a new loop (tests run one per test)
            self._loop, self._loop_thread = loop, threading.get_ident()
            self._new = asyncio.Event()
        if self.last_id > after_id:
            return True
        try:
            await asyncio.wait_for(self._new.wait(), timeout)
        except TimeoutError:
            return self.last_id > after_id
        return True


RING = LogRing()
_SKIP = frozenset({"event", "level", "timestamp", "logger"})


def capture(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: copy each supervisor line into the ring (the child's lines arrive directly)."""
    if event_dict.get("event") != "child_output":
        level = str(event_dict.get("level", method))
        fields = " ".join(f"{k}={v}" for k, v in event_dict.items() if k not in _SKIP)
        model = event_dict.get("model") or event_dict.get("profile")
        RING.append("supervisor", "warning" if level == "warn" else level,
                    f"{event_dict.get('event', '')} {fields}".strip(), model=str(model) if model else None)
    return event_dict
