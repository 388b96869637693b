"""The supervisor's HTTP face: its own routes (/health, /status, /metrics, /admin/*) and the proxy for the rest."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..child.runner import Runner
from ..fleet.drain import Drain
from ..models import status
from .api.proxy import Proxy
from .errors import EXCEPTION_HANDLERS, Receive, Scope, Send, error_doc, error_response, json_error, send_simple
from .ops import page as ui

OWN_PATHS = frozenset({"/health", "/status", "/metrics", "/child/metrics", "/admin/restart", "/admin/reload"})
ADMIN_PATHS = frozenset({"/status", "/metrics", "/child/metrics", "/admin/restart", "/admin/reload"})


def _presented_key(scope: Scope) -> bytes | None:
    for k, v in scope["headers"]:
        if k == b"authorization" and v[:7].lower() == b"bearer ":
            return v[7:].strip()
        if k == b"x-api-key":
            return v.strip()
    return None


def _key_ok(scope: Scope, expected: str) -> bool:
    got = _presented_key(scope)
    return got is not None and hmac.compare_digest(got, expected.encode())


def key_checker(secret: SecretStr | None) -> Callable[[Scope], bool]:
    """Does a request present this key (always true when no key is set)?"""
    expected = secret.get_secret_value() if secret else None
    return lambda scope: expected is None or _key_ok(scope, expected)


class App:
    """Top-level ASGI app: a path check picks the supervisor's routes or the proxy, with auth in front."""

    def __init__(self, runner: Runner, proxy: Proxy, reload: Any = None, drain: Drain | None = None,
                 ops: ui.Ops | None = None) -> None:
        self.runner, self.proxy, self.reload, self.ops = runner, proxy, reload, ops
        self.drain = drain or Drain()
        if ops is not None:
            ops.status_of = self.status_doc
        cfg = runner.cfg
        self.api_key = cfg.api_key.get_secret_value() if cfg.api_key else None
        self.admin_key = cfg.admin_key.get_secret_value() if cfg.admin_key else None
        self.own = Starlette(exception_handlers=EXCEPTION_HANDLERS, routes=[
            Route("/health", self.health), Route("/status", self.status), Route("/metrics", self.metrics),
            Route("/child/metrics", self.child_metrics), Route("/admin/restart", self.restart, methods=["POST"]),
            Route("/admin/reload", self.do_reload, methods=["POST"]),
        ])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets; lifespan is handled by the server module itself
        path = scope["path"]
        page = self.ops is not None and ui.owns(path)
        if path in OWN_PATHS or page:
            # Fail closed: with any key configured, the admin routes (and the ops page's) need the admin key,
            # or the API key when there is no admin key. /health stays open for load balancers.
            admin = path in ADMIN_PATHS or (page and ui.needs_admin(path))
            key = (self.admin_key or self.api_key) if admin else None
            if key is not None and not _key_ok(scope, key):
                await send_simple(send, *json_error(
                    401, f"{'admin' if self.admin_key else 'API'} key required: send 'Authorization: Bearer <key>' "
                         "or 'x-api-key: <key>'",
                    "authentication_error", [(b"www-authenticate", b"Bearer")]))
                return
            await (self.ops if page and self.ops is not None else self.own)(scope, receive, send)
            return
        if self.api_key is not None and not _key_ok(scope, self.api_key):
            await send_simple(send, *json_error(
                401, "API key required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                "authentication_error", [(b"www-authenticate", b"Bearer")]))
            return
        await self.proxy(scope, receive, send)

    async def health(self, request: Request) -> Response:
        m = self.runner.machine
        draining = self.drain.reason
        if self.runner.ready and draining is None:
            return JSONResponse({"status": "ok"})
        if draining is not None:  # leaving a balancer's pool: it must stop sending here first
            doc = error_doc(503, f"draining: {draining}", "unavailable_error")
            return JSONResponse({"status": "draining", "reason": draining, **doc}, status_code=503,
                                headers={"Retry-After": "5"})
        # Load balancers read the status code; "status" and "reason" are for people and scripts.
        doc = error_doc(503, f"llama-server is {m.state.value}" + (f": {m.reason}" if m.reason else ""),
                        "unavailable_error")
        return JSONResponse({"status": m.state.value, "reason": m.reason or None, **doc}, status_code=503,
                            headers={"Retry-After": "5"})

    async def status(self, request: Request) -> Response:
        return JSONResponse(await self.status_doc(self.runner))

    async def status_doc(self, runner: Runner) -> dict[str, Any]:
        """/status's body (the ops page shows the same per model)."""
        extra = {"requests": {"in_flight": self.proxy.in_flight, "waiting": self.proxy.waiting,
                              "upstream": {"active": self.proxy.gate.active, "limit": self.proxy.gate.limit,
                                           "waiting": self.proxy.gate.waiting}},
                 "quarantine": self.proxy.poison.status(),
                 "last_reload_error": self.reload.last_error if self.reload is not None else None,
                 "draining": self.drain.reason}
        return {**await status.build(runner, extra), "context": self.proxy.context.status()}

    async def metrics(self, request: Request) -> Response:
        # Collecting reads /proc and NVML: keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, self.runner.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def child_metrics(self, request: Request) -> Response:
        """llama-server's own Prometheus metrics (`llamacpp:` prefix), passed through."""
        url = self.runner.child_url
        if url is None:
            return error_response(503, "llama-server is not running", "unavailable_error", {"Retry-After": "5"})
        try:
            r = await self.runner.http.get(f"{url}/metrics")
        except httpx.HTTPError as exc:
            return error_response(502, f"llama-server did not answer: {type(exc).__name__}", "server_error")
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    async def restart(self, request: Request) -> Response:
        reset = request.query_params.get("reset", "0").lower() in ("1", "true", "yes")
        self.runner.restart("operator request" + (" (reset to profile settings)" if reset else ""), reset=reset)
        return JSONResponse({"status": self.runner.machine.state.value, "reset": reset}, status_code=202)

    async def do_reload(self, request: Request) -> Response:
        if self.reload is None:
            return error_response(501, "reload is not available", "not_supported_error")
        outcome = await self.reload.reload("api")
        if outcome["ok"]:
            return JSONResponse(outcome)
        # A rejected profile: OpenAI's error shape, plus the file and the per-field errors; "ok" stays for scripts.
        err = outcome["error"]
        doc = error_doc(422, err["message"], "invalid_request_error", file=err["file"], errors=err["errors"])
        return JSONResponse({**outcome, **doc}, status_code=422)
