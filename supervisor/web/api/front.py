"""The proxied API's front door: the route is checked, the body read once, the model it names picked, and the
request handed to that model's proxy, which waits for the model to be loaded and ready (one deadline).

With one model any `model` a client sends goes to it; with several, an unknown one is a 404 that lists them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ...models.model import Model
from ...models.pool import Pool
from ...telemetry.metrics import BoxMetrics
from ..errors import Receive, Scope, Send, json_error, send_simple
from ..guard.validate import BIG_BODY
from . import routes
from .body import TooLarge, read_body, requested_model
from .models import unknown_model
from .proxy import Proxy, refusal


class Api:
    def __init__(self, pool: Pool, metrics: BoxMetrics) -> None:
        self.pool, self.metrics = pool, metrics
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

    def _refused(self, label: str, answer: tuple[int, list[tuple[bytes, bytes]], bytes]) -> tuple[
            int, list[tuple[bytes, bytes]], bytes]:
        self.metrics.front_requests.labels(label, str(answer[0])).inc()
        return answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        route = routes.lookup(raw_path)
        refused = refusal(scope, raw_path, route)
        if refused is not None or route is None:
            await send_simple(send, *self._refused(route.label if route else "other", refused or (404, [], b"")))
            return
        deadline = time.monotonic() + self.pool.cfg.queue_wait_s
        limit = self.pool.cfg.max_body_bytes
        try:
            body = await read_body(scope, receive, limit)
        except TooLarge:  # the rest of the body is not read: close the connection rather than drain it
            await send_simple(send, *self._refused(route.label, json_error(
                413, f"request body over the limit of {limit} bytes (max_body_bytes)", "invalid_request_error",
                [(b"connection", b"close")])))
            return
        if body is None:
            return  # the client left
        # A big body (images) is looked at in a worker thread.
        requested = (requested_model(scope, body) if len(body) < BIG_BODY
                     else await asyncio.to_thread(requested_model, scope, body))
        mid = self.pool.resolve(requested)
        if mid is None:
            await send_simple(send, *self._refused(route.label, unknown_model(requested or "", self.pool.ids)))
            return
        pool = self.pool

        async def admit() -> Callable[[], None]:
            model = await pool.acquire(mid, deadline)
            return lambda: pool.release(model)

        await self.proxies[mid].serve(scope, receive, send, route, raw_path, body, admit, deadline)
