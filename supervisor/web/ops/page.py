"""The ops page (/ui) and its JSON: per-model cards, timeline events, chart samples, live logs.

The page and its static files are public (they hold no data); everything that carries data
(/ui/api/overview, /ui/api/events, /ui/api/samples, /logs/stream) needs the admin key when one is set,
like /status. Actions are the existing /admin/* routes, called by the page with the key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ...child.runner import Runner
from ...host import gpu
from ...models import status
from ...models.gpus import holders
from ...telemetry.events import Timeline
from ...telemetry.logring import LogRing
from ...telemetry.sampler import Sampler, Source
from ..errors import EXCEPTION_HANDLERS, Receive, Scope, Send
from .logstream import LogStream

STATIC = Path(__file__).parent / "static"
PUBLIC = frozenset({"/ui", "/ui/", "/ui/api/auth"})
LOG_STREAM = "/logs/stream"
WINDOW_MAX_S = 86400.0
# Only the page's own files and API: no inline script, nothing from elsewhere, no framing.
PAGE_HEADERS = {"content-security-policy": "default-src 'self'; script-src 'self'; connect-src 'self'; "
                "img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
                "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def owns(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/") or path == LOG_STREAM


def needs_admin(path: str) -> bool:
    return not (path in PUBLIC or path.startswith("/ui/static/"))


class Ops:
    """Telemetry of one supervisor and the routes that show it."""

    def __init__(self, runners: Callable[[], list[Runner]], model_docs: Callable[[], Awaitable[list[dict[str, Any]]]],
                 logs: LogRing, *, key_ok: Callable[[Scope], bool] | None, sample_interval_s: float = 2.0) -> None:
        self.runners = runners
        # The cards: every model of the catalog, loaded or not, each with its status and residency.
        self.model_docs = model_docs
        self.timeline = Timeline(logs)
        self.logs = logs
        self.sampling = sample_interval_s > 0  # 0: no sampler task, the charts stay empty
        self.sampler = Sampler(self._sources, interval_s=sample_interval_s or 2.0)
        self.stream = LogStream(logs)
        # The same key the admin routes take (web/auth.py); None: no key is set.
        self.key_ok = key_ok
        self.app = Starlette(routes=[
            Route("/ui", self.page), Route("/ui/", self.page),
            Route("/ui/api/auth", self.auth), Route("/ui/api/overview", self.overview),
            Route("/ui/api/events", self.events), Route("/ui/api/samples", self.samples),
            Mount("/ui/static", StaticFiles(directory=STATIC)),
        ], exception_handlers=EXCEPTION_HANDLERS)

    def _sources(self) -> list[Source]:
        return [Source(r.loaded.profile.name, r.metrics, r.child.pid if r.child else None) for r in self.runners()]

    def watch(self, runner: Runner) -> None:
        runner.observe(self.timeline)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == LOG_STREAM:
            await self.stream(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def page(self, request: Request) -> Response:
        if request.url.path == "/ui/":
            return RedirectResponse("/ui", status_code=308)
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache", **PAGE_HEADERS})

    async def auth(self, request: Request) -> Response:
        """Whether a key is needed and whether the one presented is right: the page asks before it polls."""
        valid = None if self.key_ok is None else self.key_ok(request.scope)
        return JSONResponse({"required": self.key_ok is not None, "valid": valid})

    async def overview(self, request: Request) -> Response:
        models = await self.model_docs()
        for s in models:
            s.pop("log_tail", None)  # the log view has the lines
            s["exits_by_cause"] = dict(self.timeline.exits.get(s["profile"]["name"], {}))
        first = next((m for m in models if "gpus" in m), None)
        if first is None:  # no model loaded: the GPUs still show
            gpus = await asyncio.to_thread(lambda: [g.as_dict() for g in gpu.snapshot()])
            first = {"gpus": gpus, "gpu_unavailable": gpu.unavailable_reason() if not gpus else None}
        pids = {m["child"]["pid"]: m["profile"]["name"] for m in models if m.get("child")}
        return JSONResponse({"models": models, "gpus": holders(pids, first["gpus"]),
                             "gpu_unavailable": first.get("gpu_unavailable"),
                             "supervisor": status.supervisor_info(),
                             "telemetry": {"sample_interval_s": self.sampler.interval_s,
                                           "sample_bytes": self.sampler.nbytes(),
                                           "events_max": self.timeline.events.maxlen,
                                           "log_lines_max": self.logs.lines.maxlen}})

    async def events(self, request: Request) -> Response:
        after = _num(request, "after", 0, int)
        return JSONResponse({"events": self.timeline.after(after, _num(request, "limit", 1000, int))})

    async def samples(self, request: Request) -> Response:
        window = min(WINDOW_MAX_S, max(10.0, _num(request, "window", 3600.0, float)))
        data = self.sampler.export(window, _num(request, "since", 0.0, float))
        if len(data["t"]) > 200:  # serialising an hour of rows takes milliseconds: not on the loop
            body = await asyncio.to_thread(json.dumps, data)
            return Response(body, media_type="application/json")
        return JSONResponse(data)


def _num(request: Request, name: str, default: Any, kind: type) -> Any:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, not {raw!r}") from None

