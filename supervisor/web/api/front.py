"""The proxied API's front door: the route is checked, the body read once, the model it names picked, and the
request handed to that model's proxy, which waits for the model to be loaded and ready (one deadline).

With one model any `model` a client sends goes to it; with several, an unknown one is a 404 that lists them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from ...models.model import Model
from ...models.pool import Pool
from ...telemetry.activity import Activity
from ...telemetry.activity_record import RECORD_ID, REPLAY_OF, Record
from ...telemetry.metrics import BoxMetrics
from ..errors import Receive, Scope, Send, json_error, send_simple
from ..guard.validate import BIG_BODY
from . import routes
from .body import TooLarge, read_body, requested_model
from .models import unknown_model
from .proxy import Proxy, refusal


class Api:
    def __init__(self, pool: Pool, metrics: BoxMetrics, activity: Activity | None = None) -> None:
        self.pool, self.metrics, self.activity = pool, metrics, activity
        self.proxies: dict[str, Proxy] = {}  # one per model, made with it and closed when it is removed
        for model in pool.models.values():
            self._made(model)
        pool.on_model.append(self._made)
        pool.on_forget.append(self._forget)

    def _made(self, model: Model) -> None:
        self.proxies[model.id] = Proxy(model)

    async def _forget(self, model: Model) -> None:
        proxy = self.proxies.pop(model.id, None)
        self.metrics.forget(model.id)
        if proxy is not None:
            await proxy.aclose()

    @contextlib.asynccontextmanager
    async def upstream_slot(self, mid: str) -> AsyncIterator[None]:
        """One of the model's upstream slots (its gate) while a request the supervisor makes itself goes to the
        child (the upgrade canary's golden set): llama-server's spare HTTP threads stay as the gate counts them."""
        proxy = self.proxies.get(mid)
        got = proxy is not None and await proxy.gate.acquire(self.pool.cfg.queue_wait_s)
        try:
            yield
        finally:
            if got and proxy is not None:
                proxy.gate.release()

    def _refused(self, label: str, answer: tuple[int, list[tuple[bytes, bytes]], bytes]) -> tuple[
            int, list[tuple[bytes, bytes]], bytes]:
        self.metrics.front_requests.labels(label, str(answer[0])).inc()
        return answer

    def _record(self, scope: Scope, raw_path: bytes, route: routes.Route | None) -> Record | None:
        """The request's activity record (None when the log is off), its id left in the scope for a replay."""
        assert self.activity is not None
        client = scope.get("client")
        rec = self.activity.begin(self.pool.default, route.label if route else raw_path.decode(
            "ascii", "backslashreplace")[:200], scope["method"], client[0] if client else None,
            replay_of=scope.get(REPLAY_OF))
        if rec is not None:
            scope[RECORD_ID] = rec.id
        return rec

    async def _answer(self, send: Send, rec: Record | None, answer: tuple[int, list[tuple[bytes, bytes]], bytes]
                      ) -> None:
        """A refusal of the supervisor's own, before any model's proxy: sent, and on the record with its reason."""
        await send_simple(send, *answer)
        if rec is not None:
            rec.status, rec.answer = answer[0], answer[2]
            rec.finish()

    def unauthorized(self, scope: Scope, message: str) -> None:
        """A request refused for its API key (the app answered it): recorded like any refusal."""
        if self.activity is not None:
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            if (rec := self._record(scope, raw_path, routes.lookup(raw_path))) is not None:
                rec.status, rec.error = 401, message
                rec.finish()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        route = routes.lookup(raw_path)
        rec = self._record(scope, raw_path, route) if self.activity is not None else None
        refused = refusal(scope, raw_path, route)
        if refused is not None or route is None:
            await self._answer(send, rec, self._refused(route.label if route else "other", refused or (404, [], b"")))
            return
        deadline = time.monotonic() + self.pool.cfg.queue_wait_s
        limit = self.pool.cfg.max_body_bytes
        try:
            body = await read_body(scope, receive, limit)
        except TooLarge:  # the rest of the body is not read: close the connection rather than drain it
            await self._answer(send, rec, self._refused(route.label, json_error(
                413, f"request body over the limit of {limit} bytes (max_body_bytes)", "invalid_request_error",
                [(b"connection", b"close")])))
            return
        if body is None:  # the client left
            if rec is not None:
                rec.error = "the client left while sending its request"
                rec.finish()
            return
        # A big body (images) is looked at in a worker thread.
        requested = (requested_model(scope, body) if len(body) < BIG_BODY
                     else await asyncio.to_thread(requested_model, scope, body))
        mid = self.pool.resolve(requested)
        if mid is None:
            if rec is not None and requested:
                rec.model = requested
            await self._answer(send, rec, self._refused(route.label, unknown_model(requested or "", self.pool.ids)))
            return
        if rec is not None:
            self._capture(rec, mid, body)
        pool = self.pool

        async def admit() -> Callable[[], None]:
            model = await pool.acquire(mid, deadline)
            return lambda: pool.release(model)

        await self.proxies[mid].serve(scope, receive, send, route, raw_path, body, admit, deadline, rec)

    def _capture(self, rec: Record, mid: str, body: bytes) -> None:
        """The model is known: its record says so, and takes what its capture setting keeps (a profile's own
        `capture` wins over the settings'; a replay is always captured, to compare)."""
        cfg, profile = self.pool.cfg, self.pool.models[mid].runner.loaded.profile
        rec.model = mid
        rec.capture = "all" if rec.replay_of is not None else profile.capture or cfg.capture
        rec.capture_media = cfg.capture_images
        if rec.capture != "off" and rec.hold(len(body)):
            rec.request_body = body  # as received, for a request refused before it is sent (replaced when sent)
