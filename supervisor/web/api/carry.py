"""One streamed request's single chance to go on after its child died: wait for the next child (as a held
request does), check the quarantine, send the continuation (web/api/resume.py) and relay its answer into the
client stream that is already open. The proxy provides the ways to the child (`Upstream`); the relay keeps the
chunks and calls `carry_on` when the stream is cut."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from ..errors import Send
from .resume import KEEP_MAX, KINDS, Splice, continuation, read_relayed, refusal
from .upstream import Response, UpstreamError

if TYPE_CHECKING:
    from ...child.progress import Exchange
    from ...models.model import Model
    from ...telemetry.activity_record import Record
    from ...telemetry.metrics import Metrics
    from ..guard.poison import PoisonGuard
    from .upstream import UpstreamPool

log = structlog.get_logger("proxy")


class Upstream(Protocol):
    async def wait_ready(self) -> tuple[bool, str]:
        """Held until a child is ready (bounded by queue_wait_s): (ready, why not)."""

    def refused(self) -> str | None:
        """Why this request may not be sent again (the quarantine), or None."""

    async def count(self, text: str) -> int | None:
        """Tokens of `text` for the current child, None when it cannot tell."""

    def exchange(self, body: bytes) -> AbstractAsyncContextManager[Response]:
        """The request with this body, sent to the current child; its response while the block runs."""


class Carry:
    __slots__ = ("doc", "kept", "kind", "metrics", "rec", "size", "upstream", "used")

    def __init__(self, kind: str, doc: dict[str, Any], upstream: Upstream, metrics: Metrics,
                 rec: Record | None = None) -> None:
        self.kind, self.doc, self.upstream, self.metrics, self.rec = kind, doc, upstream, metrics, rec
        self.kept: list[bytes] | None = []
        self.size = 0
        self.used = False

    @classmethod
    def offer(cls, route: str, body: bytes, upstream: Upstream, metrics: Metrics,
              rec: Record | None = None) -> Carry | None:
        """A carry for this request when its stream could be resumed (checked on the body as sent), else None.
        Only bodies that ask for a stream are parsed here."""
        kind = KINDS.get(route)
        if kind is None or b'"stream"' not in body:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        if refusal(kind, doc) is not None:
            return None
        return cls(kind, doc, upstream, metrics, rec)

    def keep(self, chunk: bytes) -> None:
        """Every relayed chunk (hot path: an append and an addition)."""
        if self.kept is not None:
            self.size += len(chunk)
            if self.size > KEEP_MAX:
                self.kept = None  # too long to keep: this one is not resumed
            else:
                self.kept.append(chunk)

    async def carry_on(self, send: Send, on_chunk: Callable[[bytes], None], cut: str) -> bool:
        """The stream was cut (`cut` says how): True when the answer was completed on the next child. False
        (nothing sent, or a continuation cut again) leaves the error event to the caller."""
        if self.used or self.kept is None:
            return self._no("already resumed once" if self.used else f"over {KEEP_MAX} bytes kept", cut)
        self.used = True
        relayed = read_relayed(self.kind, b"".join(self.kept))
        if relayed.why_not is not None:
            return self._no(relayed.why_not, cut)
        if relayed.finished:  # only the closing events were lost: the answer itself is whole
            if not relayed.done:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
            return True
        ready, why = await self.upstream.wait_ready()
        if not ready:
            return self._no(f"no child to carry it to: {why}", cut)
        if (blocked := self.upstream.refused()) is not None:
            return self._no(blocked, cut)
        # Tokens generated so far: /completion says; otherwise the events that carried text (one a token, but for
        # the few llama-server holds back and merges: an incomplete UTF-8 character, a partial stop word).
        # What the text adds to the continuation's prompt is counted by the child itself.
        before = relayed.predicted if relayed.predicted is not None else relayed.pieces
        counted = await self.upstream.count(relayed.text) if relayed.text else 0
        prefix = counted if counted is not None else before
        body = json.dumps(continuation(self.kind, self.doc, relayed, before), ensure_ascii=False).encode()
        splice = Splice(self.kind, relayed, before, prefix)
        try:
            async with self.upstream.exchange(body) as resp:
                if resp.status != 200:
                    return self._no(f"the continuation was answered {resp.status}", cut)
                async for chunk in resp:
                    out = splice.feed(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                        on_chunk(out)
        except UpstreamError as exc:
            return self._no(f"the continuation failed too ({type(exc).__name__}: {exc})", cut)
        self.metrics.streams_resumed.inc()
        note = f"stream resumed on the next child after {before} tokens ({cut})"
        if self.rec is not None:
            self.rec.note(note)
        log.info("stream_resumed", kind=self.kind, tokens_before=before, chars_before=len(relayed.text), cut=cut)
        return True

    def _no(self, why: str, cut: str) -> bool:
        log.info("stream_not_resumed", kind=self.kind, why=why, cut=cut)
        return False


@dataclass
class ChildUpstream:
    """The ways to the child for one request's carry, the proxy's own: held like any request while no child is
    ready, refused when quarantined, and the continuation counted against the original request in the poison
    guard (it is what a second crash would convict)."""

    model: Model
    pool: UpstreamPool
    poison: PoisonGuard
    settle: Callable[[int], Awaitable[None]]  # the proxy's: a moment for the runner to see a child's end
    target: bytes
    headers: list[tuple[bytes, bytes]]
    digest: str
    what: str
    ex: Exchange
    gen: int = -1  # the child the first answer came from

    def __post_init__(self) -> None:
        self.gen = self.model.runner.machine.gen

    async def wait_ready(self) -> tuple[bool, str]:
        # The cut is often seen here before the runner sees the child's end: give it that moment first, so the
        # wait is for the next child, not a look at the dead one. Held as long as any request (queue_wait_s).
        await self.settle(self.gen)
        return await self.model.wait_ready(time.monotonic() + self.model.runner.cfg.queue_wait_s)

    def refused(self) -> str | None:
        return self.poison.refusal(self.digest)

    async def count(self, text: str) -> int | None:
        base = self.model.runner.child_url
        if base is None:
            return None
        body = json.dumps({"content": text, "add_special": False, "parse_special": False}).encode()
        try:  # /tokenize is answered by llama-server's HTTP threads: cheap, no slot taken
            status, data = await self.pool.fetch(base, "POST", "/tokenize", body, 10.0)
            tokens = json.loads(data).get("tokens") if status == 200 else None
        except (UpstreamError, ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None

    @asynccontextmanager
    async def exchange(self, body: bytes) -> AsyncIterator[Response]:
        r = self.model.runner
        gen = r.machine.gen
        self.poison.sent(gen, self.digest, self.what)
        self.ex.last = time.monotonic()  # the request's silence counts again from here (liveness)
        whole = False
        try:
            resp = await self.pool.send(r.child_url, "POST", self.target, self.headers, body)
            try:
                yield resp
                whole = True
            finally:
                await resp.aclose()
        finally:
            self.poison.finished(gen, self.digest, whole)
