"""The HTTP face of a box with several models: the request's `model` picks the runner (through the pool),
and the supervisor's own routes answer for every model. With one profile, web/app.py serves as before."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..child.runner import Runner
from ..fleet.drain import Drain
from ..models import pool_status, status
from ..models.model import Slot
from ..models.pool import Pool, Unavailable
from .api.body import read_body, requested_model, too_large
from .api.models import unknown_model
from .api.proxy import BIG_BODY
from .app import _key_ok
from .errors import EXCEPTION_HANDLERS, Receive, Scope, Send, error_doc, error_response, json_error, send_simple
from .ops import page as ui

ADMIN_PREFIX = "/admin/"
OPEN_PATHS = frozenset({"/health"})
ADMIN_PATHS = frozenset({"/status", "/metrics", "/child/metrics"})
API_OWN = frozenset({"/v1/models", "/models"})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body was read to find the model: hand it to the proxy again, then the real stream (disconnects)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    return again


class Front:
    def __init__(self, pool: Pool, reload: Any = None, drain: Drain | None = None, ops: ui.Ops | None = None) -> None:
        self.pool, self.reload, self.ops = pool, reload, ops
        self.drain = drain or Drain()
        if ops is not None:
            ops.status_of, ops.model_docs = self.status_doc, self.page_models
        cfg = pool.cfg
        self.api_key = cfg.api_key.get_secret_value() if cfg.api_key else None
        self.admin_key = cfg.admin_key.get_secret_value() if cfg.admin_key else None
        self.own = Starlette(exception_handlers=EXCEPTION_HANDLERS, routes=[
            Route("/health", self.health), Route("/status", self.status), Route("/metrics", self.metrics),
            Route("/v1/models", self.models), Route("/models", self.models),
            Route("/child/metrics", self.child_metrics),
            Route("/admin/models/{model}/{action}", self.admin_model, methods=["POST"]),
            Route("/admin/restart", self.restart, methods=["POST"]),
            Route("/admin/reload", self.do_reload, methods=["POST"]),
        ])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        page = self.ops is not None and ui.owns(path)
        if path in OPEN_PATHS or (page and not ui.needs_admin(path)):
            await (self.ops if page and self.ops is not None else self.own)(scope, receive, send)
            return
        admin = page or path in ADMIN_PATHS or path.startswith(ADMIN_PREFIX)
        # Fail closed, as with one model: admin routes need the admin key, or the API key when there is none.
        key = (self.admin_key or self.api_key) if admin else self.api_key
        if key is not None and not _key_ok(scope, key):
            what = "admin key" if admin and self.admin_key else "API key"
            await send_simple(send, *json_error(
                401, f"{what} required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                "authentication_error", [(b"www-authenticate", b"Bearer")]))
            return
        if page and self.ops is not None:
            await self.ops(scope, receive, send)
            return
        if admin or (path in API_OWN and scope["method"] == "GET"):
            await self.own(scope, receive, send)
            return
        await self.proxy(scope, receive, send)

    # ---- the proxied API ---------------------------------------------------------------------------

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.pool.cfg.max_body_bytes
        body = await read_body(receive, limit)
        if body is None:
            return
        if len(body) > limit:
            await send_simple(send, *too_large(limit))
            return
        # A big body (images) is parsed in a worker thread, as the proxy does.
        requested = (requested_model(scope, body) if len(body) < BIG_BODY
                     else await asyncio.to_thread(requested_model, scope, body))
        mid = self.pool.resolve(requested)
        if mid is None:
            await send_simple(send, *unknown_model(requested or "", self.pool.ids))
            return
        try:
            slot = await self.pool.acquire(mid)
        except Unavailable as exc:
            await send_simple(send, *json_error(503, str(exc), "unavailable_error", [(b"retry-after", b"5")]))
            return
        try:
            assert slot.proxy is not None
            await slot.proxy(scope, _replay(body, receive), send)
        finally:
            self.pool.release(slot)

    # ---- own routes ----------------------------------------------------------------------------

    def _slot(self, request: Request, param: str | None) -> Slot | Response:
        mid = self.pool.resolve(param) if param else self.pool.default
        if mid is None:
            status, _, body = unknown_model(param or "", self.pool.ids)
            return Response(body, status_code=status, media_type="application/json")
        return self.pool.slots[mid]

    async def health(self, request: Request) -> Response:
        if self.drain.reason is not None:  # leaving a balancer's pool: it must stop sending here first
            doc = error_doc(503, f"draining: {self.drain.reason}", "unavailable_error")
            return JSONResponse({"status": "draining", "reason": self.drain.reason, **doc}, status_code=503,
                                headers={"Retry-After": "5"})
        param = request.query_params.get("model")
        if param is not None:
            found = self._slot(request, param)
            if isinstance(found, Response):
                return found
            code, doc = pool_status.health(self.pool, found.id)
        else:
            code, doc = pool_status.health(self.pool, None)
        if code != 200:
            doc["error"] = {"message": doc["reason"], "type": "unavailable_error", "code": code}
        return JSONResponse(doc, status_code=code, headers={"Retry-After": "5"} if code != 200 else None)

    async def status(self, request: Request) -> Response:
        return JSONResponse(await pool_status.build(self.pool, self.status_doc))

    async def status_doc(self, runner: Runner) -> dict[str, Any]:
        """One model's /status body (the ops page shows the same per model): with what its proxy owns."""
        slot = next((s for s in self.pool.slots.values() if s.runner is runner), None)
        proxy = slot.proxy if slot is not None else None
        extra: dict[str, Any] = {"draining": self.drain.reason}
        if proxy is not None:
            extra.update(requests={"in_flight": proxy.in_flight, "waiting": proxy.waiting,
                                   "upstream": {"active": proxy.gate.active, "limit": proxy.gate.limit,
                                                "waiting": proxy.gate.waiting}},
                         quarantine=proxy.poison.status())
        doc = await status.build(runner, extra)
        if proxy is not None:
            doc["context"] = proxy.context.status()
        return doc

    async def page_models(self) -> list[dict[str, Any]]:
        """The ops page's cards: every model of the catalog, loaded or not, each with its residency section."""
        docs = []
        for slot in list(self.pool.slots.values()):
            runner = slot.runner
            doc = await self.status_doc(runner) if runner is not None else pool_status.unloaded(slot)
            doc["residency"] = pool_status.section(self.pool, slot)
            docs.append(doc)
        return docs

    async def models(self, request: Request) -> Response:
        return JSONResponse(pool_status.models_list(self.pool))

    async def metrics(self, request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, self.pool.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def child_metrics(self, request: Request) -> Response:
        found = self._slot(request, request.query_params.get("model"))
        if isinstance(found, Response):
            return found
        runner = found.runner
        if runner is None or runner.child_url is None:
            return error_response(503, f"model '{found.id}' is not running", "unavailable_error", {"Retry-After": "5"})
        try:
            r = await runner.http.get(f"{runner.child_url}/metrics")
        except httpx.HTTPError as exc:
            return error_response(502, f"llama-server did not answer: {type(exc).__name__}", "server_error")
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    async def admin_model(self, request: Request) -> Response:
        found = self._slot(request, request.path_params["model"])
        if isinstance(found, Response):
            return found
        action = request.path_params["action"]
        if action == "load":
            self.pool.request_load(found.id)
        elif action == "unload":
            if found.loaded.profile.pinned:
                return error_response(409, f"model '{found.id}' is pinned: it is never unloaded", "conflict_error")
            if not self.pool.request_unload(found.id):
                return JSONResponse({"model": found.id, "state": pool_status.model_state(found)})
        else:
            return error_response(404, f"unknown action '{action}': load or unload", "invalid_request_error")
        return JSONResponse({"model": found.id, "state": pool_status.model_state(found), "action": action},
                            status_code=202)

    async def restart(self, request: Request) -> Response:
        found = self._slot(request, request.query_params.get("model"))
        if isinstance(found, Response):
            return found
        if found.runner is None:
            return error_response(409, f"model '{found.id}' is not loaded: POST /admin/models/{found.id}/load",
                                  "conflict_error")
        reset = request.query_params.get("reset", "0").lower() in ("1", "true", "yes")
        found.runner.restart("operator request" + (" (reset to profile settings)" if reset else ""), reset=reset)
        return JSONResponse({"model": found.id, "status": found.runner.machine.state.value, "reset": reset},
                            status_code=202)

    async def do_reload(self, request: Request) -> Response:
        if self.reload is None:
            return error_response(501, "reload is not available", "not_supported_error")
        outcome = await self.reload.reload("api")
        return JSONResponse(outcome, status_code=200 if outcome.get("ok") else 422)
