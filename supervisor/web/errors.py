"""The one shape of every error the supervisor itself makes: OpenAI's `{"error": {"message", "type", "code"}}`,
so the official clients raise a readable APIError from it. llama-server's own errors pass through unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
log = structlog.get_logger("http")


def error_doc(status: int, message: str, kind: str, **extra: Any) -> dict[str, Any]:
    """`extra` adds fields inside "error" (e.g. a reload's file and per-field errors)."""
    return {"error": {"message": message, "type": kind, "code": status, **extra}}


def json_error(status: int, message: str, kind: str, headers: Headers | None = None, **extra: Any
               ) -> tuple[int, Headers, bytes]:
    """(status, headers, body) for `send_simple`: the proxy's hot path answers in raw ASGI."""
    body = json.dumps(error_doc(status, message, kind, **extra)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, hdrs + (headers or []), body


def error_response(status: int, message: str, kind: str, headers: Mapping[str, str] | None = None) -> Response:
    """The same error as a Starlette response, for the supervisor's own routes."""
    return JSONResponse(error_doc(status, message, kind), status_code=status, headers=headers)


async def send_simple(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json_http_error(request: Request, exc: Exception) -> Response:
    """404/405 on the supervisor's own routes as JSON, like every other error it returns."""
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                          "invalid_request_error", exc.headers)


async def _json_server_error(request: Request, exc: Exception) -> Response:
    """A bug in one of the supervisor's own routes: still JSON (Starlette then logs the exception)."""
    return error_response(500, f"supervisor error: {type(exc).__name__}", "server_error")


# For the supervisor's Starlette apps (its own routes, the ops page).
EXCEPTION_HANDLERS: dict[Any, Any] = {HTTPException: _json_http_error, Exception: _json_server_error}


class JsonGuard:
    """The outermost ASGI layer. uvicorn answers a request whose task ends without a response with a plain-text
    500; the one left that way is a request cancelled when the graceful shutdown ran out (`drain_s`): it gets
    a JSON 503 with Retry-After instead (another box, or this one restarted, can serve it). Nothing is added
    to a request's path until then: whether a response was under way is learnt from the server, which refuses
    a second response start."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise
            status, headers, body = json_error(
                503, "the supervisor is shutting down and could not finish this request in time (drain_s)",
                "unavailable_error", [(b"retry-after", b"5"), (b"connection", b"close")])
            try:
                await send({"type": "http.response.start", "status": status, "headers": headers})
            except Exception:  # noqa: BLE001  (a response was under way: it is cut, uvicorn closes the connection)
                raise asyncio.CancelledError from None
            log.warning("request_cancelled", path=scope.get("path"), reason="graceful shutdown ran out (drain_s)")
            with contextlib.suppress(Exception):  # the client may be gone already
                await send({"type": "http.response.body", "body": body})
            # Answered: the task ends normally. uvicorn cancelled it and does not wait for it, so nothing is
            # held back by not re-raising, and it logs no traceback for a request that did get an answer.
