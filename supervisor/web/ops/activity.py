"""The activity log's routes: GET /activity (filters, newest first), GET /activity/stats (percentiles per model
over a window), GET /activity/{id} (one record with its capture), and POST /admin/activity/{id}/replay, which
sends a captured request again through the normal request path and answers the new record's id.

All of them need the admin key when one is set (the app checks it before they are reached).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...telemetry.activity import Activity
from ...telemetry.activity_record import RECORD_ID, REPLAY_OF
from ...telemetry.activity_store import STATUS_CLASSES, Filters
from ..errors import Receive, Scope, Send, error_response

LIMIT_MAX = 1000
WINDOW_MAX_S = 86400.0 * 31
PATHS = ("/activity", "/activity/")
ADMIN_PREFIX = "/admin/activity/"
Dispatch = Callable[[Scope, Receive, Send], Awaitable[None]]


def owns(path: str) -> bool:
    return path in PATHS or path.startswith(("/activity/", ADMIN_PREFIX))


class BadQuery(ValueError):
    pass


def _arg(request: Request, name: str, kind: type, default: Any = None) -> Any:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise BadQuery(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}") from None


def filters(request: Request) -> Filters:
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUS_CLASSES and not (status.isdigit() and 100 <= int(status) <= 599):
        raise BadQuery(f"status must be one of {', '.join(STATUS_CLASSES)} or a code (100-599), not {status!r}")
    limit = _arg(request, "limit", int, 100)
    if not 1 <= limit <= LIMIT_MAX:
        raise BadQuery(f"limit must be between 1 and {LIMIT_MAX}, not {limit}")
    return Filters(limit=limit, before=_arg(request, "before", int), model=request.query_params.get("model") or None,
                   status=status, min_duration_ms=_arg(request, "min_duration_ms", float))


class ActivityRoutes:
    """`dispatch` is the app's request path behind authentication (model routing, then the proxy)."""

    def __init__(self, activity: Activity, dispatch: Dispatch) -> None:
        self.activity, self.dispatch = activity, dispatch

    def routes(self) -> list[Route]:
        return [Route("/activity", self.list), Route("/activity/stats", self.stats),
                Route("/activity/{rid:int}", self.one),
                Route("/admin/activity/{rid:int}/replay", self.replay, methods=["POST"])]

    async def list(self, request: Request) -> Response:
        try:
            f = filters(request)
        except BadQuery as exc:
            return error_response(400, str(exc), "invalid_request_error")
        return JSONResponse({"requests": await self.activity.list(f), "log": self.activity.status()})

    async def stats(self, request: Request) -> Response:
        try:
            window = _arg(request, "window", float, 3600.0)
        except BadQuery as exc:
            return error_response(400, str(exc), "invalid_request_error")
        window = min(WINDOW_MAX_S, max(1.0, window))
        return JSONResponse({"window_s": window, "models": await self.activity.stats(window)})

    async def _record(self, request: Request) -> tuple[int, dict[str, Any] | Response]:
        rid = request.path_params["rid"]
        doc = await self.activity.get(rid)
        if doc is None:
            return rid, error_response(404, f"activity record {rid}: not kept (never, or removed by retention)",
                                       "not_found_error")
        return rid, doc

    async def one(self, request: Request) -> Response:
        _, doc = await self._record(request)
        return doc if isinstance(doc, Response) else JSONResponse(doc)

    async def replay(self, request: Request) -> Response:
        rid, doc = await self._record(request)
        if isinstance(doc, Response):
            return doc
        cap = doc.get("capture") or {}
        why = ("it was not captured (capture: off, or errors and it succeeded)" if not cap.get("request")
               else "its capture was cut at capture_max_kib" if cap.get("truncated")
               else "its images were kept as SHA-256 only (capture_images: false)" if cap.get("images_hashed")
               else None)
        if why is not None:
            return error_response(409, f"activity record {rid} cannot be replayed: {why}", "invalid_request_error")
        body = cap["request"].encode()
        model = request.query_params.get("model") or None
        if model is not None:
            try:
                sent = json.loads(body)
            except ValueError:
                return error_response(409, f"activity record {rid}: its request is not JSON, so ?model= cannot "
                                           "be applied", "invalid_request_error")
            sent["model"] = model
            body = json.dumps(sent).encode()
        # The body was captured as sent upstream: /predict's went as a chat completion.
        path = "/v1/chat/completions" if doc["route"] == "/predict" else doc["route"]
        status, new_id = await self._send(path, doc.get("method") or "POST", body, rid, request)
        if new_id is None:
            return error_response(502, f"replay of {rid} was answered {status} without an activity record "
                                       "(is the activity log on?)", "server_error")
        return JSONResponse({"id": new_id, "replay_of": rid, "status": status, "model": model or doc["model"]})

    async def _send(self, path: str, method: str, body: bytes, rid: int, request: Request) -> tuple[int, int | None]:
        """One request through the normal path, its answer read to the end and dropped (the record keeps it)."""
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": request.scope.get("client"), "server": request.scope.get("server"), REPLAY_OF: rid}
        sent = False
        status = [0]

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            while (await request.receive())["type"] != "http.disconnect":
                pass  # the admin's own client leaving ends the replay too
            return {"type": "http.disconnect"}

        async def send(msg: MutableMapping[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]

        await self.dispatch(scope, receive, send)
        return status[0], scope.get(RECORD_ID)
