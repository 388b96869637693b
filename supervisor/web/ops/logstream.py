"""GET /logs/stream: the log ring as server-sent events (works with `curl -N` and with EventSource).

On connect: the last `n` lines (default 200), or, with `Last-Event-ID` (header, or `last_id` in the query
for clients that cannot set headers), every line after that id, preceded by a `gap` event when the ring
no longer holds some of them. Then new lines as they come, and a comment every 15 s so proxies and
clients see the connection is alive. Filters: `level` (minimum), `source` (child|supervisor), `model`.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs

from ...telemetry.logring import LEVELS, Line, LogRing
from ..errors import Receive, Scope, Send, json_error, send_simple

KEEPALIVE_S = 15.0
MAX_STREAMS = 16


def _event(line: Line) -> bytes:
    return f"id: {line.id}\nevent: log\ndata: {json.dumps(line.as_dict())}\n\n".encode()


class LogStream:
    def __init__(self, ring: LogRing, keepalive_s: float = KEEPALIVE_S, max_streams: int = MAX_STREAMS) -> None:
        self.ring = ring
        self.keepalive_s = keepalive_s
        self.max_streams = max_streams
        self.open = 0
        self.closing = asyncio.Event()  # set at shutdown: open streams end, so the server can stop at once

    def close(self) -> None:
        self.closing.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await send_simple(send, *json_error(405, f"{scope['method']} /logs/stream: Method Not Allowed",
                                                "invalid_request_error"))
            return
        q = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        try:
            n = max(0, min(int(q.get("n", 200)), self.ring.lines.maxlen or 0))
            min_level = LEVELS[q.get("level", "debug").lower()]
            last_id = next((int(v) for k, v in scope["headers"] if k == b"last-event-id"), None)
            if last_id is None and "last_id" in q:
                last_id = int(q["last_id"])
        except (ValueError, KeyError) as exc:
            await send_simple(send, *json_error(400, f"/logs/stream: bad parameter: {exc}", "invalid_request_error"))
            return
        if last_id is not None and last_id > self.ring.last_id:
            last_id = None  # an id from before the supervisor restarted: start afresh with the tail
        source, model = q.get("source"), q.get("model")
        if self.open >= self.max_streams:
            await send_simple(send, *json_error(503, f"too many log streams open ({self.open})", "unavailable_error",
                                                [(b"retry-after", b"5")]))
            return

        def wanted(ln: Line) -> bool:
            return (LEVELS.get(ln.level, 20) >= min_level and (source in (None, "", "all") or ln.source == source)
                    and (not model or ln.model in (None, model)))

        self.open += 1
        gone = asyncio.ensure_future(_disconnected(receive))
        closing = asyncio.ensure_future(self.closing.wait())
        waiter: asyncio.Future[bool] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            if last_id is None:
                first, missed = self.ring.tail(n), 0
            else:
                first, missed = self.ring.after(last_id)
            head = b"retry: 2000\n\n"
            if missed:
                head += f"event: gap\ndata: {json.dumps({'missed': missed})}\n\n".encode()
            await send({"type": "http.response.body", "body": head + b"".join(_event(ln) for ln in first if wanted(ln)),
                        "more_body": True})
            sent = first[-1].id if first else (self.ring.last_id if last_id is None else last_id)
            while True:
                waiter = asyncio.ensure_future(self.ring.wait(sent, self.keepalive_s))
                await asyncio.wait((waiter, gone, closing), return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    break
                if closing.done():
                    await send({"type": "http.response.body", "body": b""})
                    break
                lines, missed = self.ring.after(sent)
                body = f"event: gap\ndata: {json.dumps({'missed': missed})}\n\n".encode() if missed else b""
                body += b"".join(_event(ln) for ln in lines if wanted(ln))
                if lines:
                    sent = lines[-1].id
                await send({"type": "http.response.body", "body": body or b": keepalive\n\n", "more_body": True})
        except OSError:
            pass  # the client went away mid-write
        finally:
            self.open -= 1
            for task in (gone, closing, waiter):
                if task is not None:
                    task.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
