"""Signs of life from a child, as liveness reads them: when the last byte came, from any answer and from a
stream (which only the inference loop produces), how long the quietest exchange in flight has gone without one,
and what the probes of the inference loop found. `note` is on the proxy's hot path (once per streamed chunk): a
clock read and a few attribute writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..core.liveness import Pace


class Exchange:
    """One request on its way to the child: the time of its last byte (or of its start, before the first)."""

    __slots__ = ("last",)

    def __init__(self, now: float) -> None:
        self.last = now


class Progress:
    def __init__(self) -> None:
        self.last = 0.0  # monotonic time of the last byte or whole answer from the child (warmup included)
        self.last_stream = 0.0  # ... of the last streamed chunk: generated text, so the loop ran
        self._open: set[Exchange] = set()  # at most the upstream gate's limit

    def note(self, *, stream: bool = False, ex: Exchange | None = None) -> None:
        now = time.monotonic()
        self.last = now
        if stream:
            self.last_stream = now
        if ex is not None:
            ex.last = now

    def opened(self) -> Exchange:
        """A request is on its way to the child: its silence counts from now."""
        ex = Exchange(time.monotonic())
        self._open.add(ex)
        return ex

    def closed(self, ex: Exchange) -> None:
        self._open.discard(ex)

    def stalled_for(self, now: float) -> float:
        """The longest an exchange in flight has gone without a byte (0 with none in flight)."""
        return now - min(ex.last for ex in self._open) if self._open else 0.0

    def in_flight(self) -> int:
        return len(self._open)


@dataclass
class LoopWatch:
    """What the probes found about the current child's inference loop (for /status and the metrics)."""

    gen: int = -1
    routes: tuple[str, ...] = ()  # loop routes still usable for this child, best first
    latency_s: float | None = None  # the last answered probe's round trip
    answered_at: float | None = None  # monotonic
    rounds: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    pace: Pace | None = None  # the loop's work at the last answer, and since when it stood still

    def reset(self, gen: int, routes: tuple[str, ...]) -> None:
        self.gen, self.routes, self.latency_s, self.answered_at, self.pace = gen, routes, None, None, None

    def status(self, now: float) -> dict[str, Any]:
        return {"route": self.routes[0] if self.routes else None,
                "latency_ms": None if self.latency_s is None else round(self.latency_s * 1000, 2),
                "answered_s_ago": None if self.answered_at is None else round(now - self.answered_at, 1),
                "rounds": self.rounds, "outcomes": dict(self.outcomes)}
