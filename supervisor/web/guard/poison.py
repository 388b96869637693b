"""Poison requests, on the proxy's side: which requests were in flight when a child died, and the quarantine
that core/quarantine.py decides from them. Only hashes are kept, in memory."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from ...core import quarantine as q
from ...core.crash import Verdict
from ...telemetry.metrics import Metrics
from .validate import BIG_BODY

log = structlog.get_logger("proxy")


class PoisonGuard:
    def __init__(self, metrics: Metrics, policy: q.Policy) -> None:
        self.metrics = metrics
        self.policy = policy
        self.state = q.Quarantine()
        # generation → request hash → [in flight now, cut by the child's end, description]
        self._sent: dict[int, dict[str, list[Any]]] = {}

    async def digest(self, method: str, path: str, body: bytes) -> str:
        """The request's hash; a big body (images) is hashed in a worker thread, off the event loop."""
        if len(body) > BIG_BODY:
            return await asyncio.to_thread(q.request_hash, method, path, body)
        return q.request_hash(method, path, body)

    def refusal(self, h: str) -> str | None:
        """The error message for a quarantined request, or None when `h` may go through."""
        now = time.monotonic()
        b = q.lookup(self.state, h, now)
        if b is None:
            return None
        self.metrics.quarantine_hits.inc()
        return (f"request {h} is quarantined: llama-server crashed twice within {self.policy.window_s:.0f}s while it "
                f"was in flight, so it is refused until {wall(b.until, now)} instead of taking the server down for "
                "everyone again. Change the request (prompt, image, parameters) or ask the operator")

    def sent(self, gen: int, h: str, what: str) -> None:
        entry = self._sent.setdefault(gen, {}).setdefault(h, [0, False, what])
        entry[0] += 1

    def finished(self, gen: int, h: str, answered: bool) -> None:
        """The exchange with child `gen` ended; `answered`: the child gave a whole answer (not a suspect)."""
        per_gen = self._sent.get(gen)
        entry = per_gen.get(h) if per_gen else None
        if per_gen is None or entry is None:
            return
        entry[0] -= 1
        if not answered:
            entry[1] = True  # cut or refused: it may be what killed the child
        elif entry[0] <= 0 and not entry[1]:
            del per_gen[h]

    def on_exit(self, gen: int, verdict: Verdict, returncode: int | None) -> None:
        per_gen = self._sent.pop(gen, {})
        for old in [g for g in self._sent if g < gen]:
            del self._sent[old]
        suspects = {h: e[2] for h, e in per_gen.items() if e[0] > 0 or e[1]}
        now = time.monotonic()
        if suspects and q.counts(verdict.cause.value, returncode):
            self.state, newly = q.on_crash(self.state, now, suspects, self.policy)
            for h in newly:
                b = self.state.blocked[h]
                log.warning("request_quarantined", request=h, what=b.what, crashes=len(b.crashes),
                            seconds=self.policy.duration_s, detail=verdict.detail)
        else:
            self.state = q.prune(self.state, now, self.policy)
        self.metrics.quarantined.set(len(self.state.blocked))

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        self.state = q.prune(self.state, now, self.policy)
        self.metrics.quarantined.set(len(self.state.blocked))
        return {"window_s": self.policy.window_s, "duration_s": self.policy.duration_s,
                "requests": [{"request": h, "what": b.what, "until": wall(b.until, now)}
                             for h, b in self.state.blocked.items()]}


def wall(mono: float, now: float) -> str:
    return datetime.fromtimestamp(time.time() + (mono - now), UTC).isoformat(timespec="seconds")
