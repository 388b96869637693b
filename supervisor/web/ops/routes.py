"""The supervisor's own routes: /health, /status, /metrics, /v1/models, /child/metrics, /plan, /activity and
/admin/*. The same on every box: one profile is a pool of one model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...fleet.drain import Drain
from ...models import gpus, status
from ...models.model import Model
from ...models.pool import Pool
from ...models.upgrade import Upgrades
from ...models.watch import Reloader
from ...telemetry.activity import Activity
from ..api.front import Api
from ..api.models import unknown_model
from ..errors import EXCEPTION_HANDLERS, error_doc, error_response
from .activity import ActivityRoutes

OPEN_PATHS = frozenset({"/health"})
ADMIN_PATHS = frozenset({"/status", "/metrics", "/child/metrics", "/plan"})
ADMIN_PREFIX = "/admin/"
API_OWN = frozenset({"/v1/models", "/models"})  # API routes the supervisor answers itself (GET)


class Own:
    def __init__(self, pool: Pool, api: Api, reloader: Reloader, drain: Drain, activity: Activity | None = None,
                 upgrades: Upgrades | None = None) -> None:
        self.pool, self.api, self.reloader, self.drain, self.upgrades = pool, api, reloader, drain, upgrades
        self.app = Starlette(exception_handlers=EXCEPTION_HANDLERS, routes=[
            Route("/health", self.health), Route("/status", self.status), Route("/metrics", self.metrics),
            Route("/v1/models", self.models), Route("/models", self.models),
            Route("/child/metrics", self.child_metrics), Route("/plan", self.plan),
            Route("/admin/models/{model}/{action}", self.admin_model, methods=["POST"]),
            Route("/admin/restart", self.restart, methods=["POST"]),
            Route("/admin/reload", self.do_reload, methods=["POST"]),
            # the activity log's; a replay goes the API's way, behind the key check it already passed here
            *(ActivityRoutes(activity, api).routes() if activity is not None else []),
            Route("/admin/upgrade", self.upgrade, methods=["POST"]),
            Route("/admin/drain", self.admin_drain, methods=["POST", "DELETE"]),
        ])

    def _model(self, param: str | None) -> Model | Response:
        mid = self.pool.resolve(param) if param else self.pool.default
        if mid is None:
            code, _, body = unknown_model(param or "", self.pool.ids)
            return Response(body, status_code=code, media_type="application/json")
        return self.pool.models[mid]

    async def health(self, request: Request) -> Response:
        if self.drain.reason is not None:  # leaving a balancer's pool: it must stop sending here first
            doc = error_doc(503, f"draining: {self.drain.reason}", "unavailable_error")
            return JSONResponse({"status": "draining", "reason": self.drain.reason, **doc}, status_code=503,
                                headers={"Retry-After": "5"})
        param = request.query_params.get("model")
        found = self._model(param) if param is not None else None
        if isinstance(found, Response):
            return found
        code, doc = status.health(self.pool, found.id if found is not None else None)
        if code != 200:  # load balancers read the status code; "status" and "reason" are for people and scripts
            doc["error"] = {"message": doc["reason"], "type": "unavailable_error", "code": code}
        return JSONResponse(doc, status_code=code, headers={"Retry-After": "5"} if code != 200 else None)

    async def model_doc(self, model: Model) -> dict[str, Any]:
        """One model's status, with what its proxy owns (the page shows the same per model)."""
        proxy = self.api.proxies.get(model.id)
        extra: dict[str, Any] = {"draining": self.drain.reason}
        builds = self.upgrades.models.get(model.id) if self.upgrades is not None else None
        if builds is not None:
            extra["builds"] = builds.as_dict()
        if proxy is not None:
            extra.update(upstream={"active": proxy.gate.active, "limit": proxy.gate.limit,
                                   "waiting": proxy.gate.waiting},
                         quarantine=proxy.poison.status(), context=proxy.context.status())
        return await status.model_doc(model, extra)

    async def status(self, request: Request) -> Response:
        top = await self.model_doc(self.pool.models[self.pool.default])
        return JSONResponse(status.box(self.pool, top, {"last_reload_error": self.reloader.last_error}))

    async def page_models(self) -> list[dict[str, Any]]:
        """The page's cards: every model of the catalog, loaded or not, each with its residency section."""
        docs = []
        for model in list(self.pool.models.values()):
            doc = await self.model_doc(model)
            doc["residency"] = status.section(self.pool, model)
            doc["plan"] = None if model.resident else await gpus.plan(self.pool, model)  # where it would go
            docs.append(doc)
        return docs

    async def plan(self, request: Request) -> Response:
        """What loading the model (`?model=`, else the default) would do now; nothing is done."""
        found = self._model(request.query_params.get("model"))
        if isinstance(found, Response):
            return found
        return JSONResponse(await gpus.plan(self.pool, found))

    async def models(self, request: Request) -> Response:
        return JSONResponse(status.models_list(self.pool))

    async def metrics(self, request: Request) -> Response:
        # Collecting reads /proc and NVML: keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, self.pool.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def child_metrics(self, request: Request) -> Response:
        """llama-server's own Prometheus metrics (`llamacpp:` prefix), passed through."""
        found = self._model(request.query_params.get("model"))
        if isinstance(found, Response):
            return found
        runner = found.runner
        if runner.child_url is None:
            return error_response(503, f"model '{found.id}' is not running", "unavailable_error", {"Retry-After": "5"})
        try:
            r = await runner.http.get(f"{runner.child_url}/metrics")
        except httpx.HTTPError as exc:
            return error_response(502, f"llama-server did not answer: {type(exc).__name__}", "server_error")
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    async def admin_model(self, request: Request) -> Response:
        found = self._model(request.path_params["model"])
        if isinstance(found, Response):
            return found
        action = request.path_params["action"]
        if action == "load":
            self.pool.request_load(found.id)
        elif action == "unload":
            if found.loaded.profile.pinned:
                return error_response(409, f"model '{found.id}' is pinned: it is never unloaded", "conflict_error")
            if not self.pool.request_unload(found.id):
                return JSONResponse({"model": found.id, "state": found.state_word()})
        else:
            return error_response(404, f"unknown action '{action}': load or unload", "invalid_request_error")
        return JSONResponse({"model": found.id, "state": found.state_word(), "action": action}, status_code=202)

    async def restart(self, request: Request) -> Response:
        found = self._model(request.query_params.get("model"))
        if isinstance(found, Response):
            return found
        if not found.resident:
            return error_response(409, f"model '{found.id}' is not loaded: POST /admin/models/{found.id}/load",
                                  "conflict_error")
        reset = request.query_params.get("reset", "0").lower() in ("1", "true", "yes")
        found.runner.restart("operator request" + (" (reset to profile settings)" if reset else ""), reset=reset)
        return JSONResponse({"model": found.id, "status": found.runner.machine.state.value, "reset": reset},
                            status_code=202)

    async def do_reload(self, request: Request) -> Response:
        outcome = await self.reloader.reload("api")
        if outcome["ok"]:
            return JSONResponse(outcome)
        # A rejected profile: OpenAI's error shape, plus the file and the per-field errors; "ok" stays for scripts.
        err = outcome["error"]
        doc = error_doc(422, err["message"], "invalid_request_error", file=err["file"], errors=err["errors"])
        return JSONResponse({**outcome, **doc}, status_code=422)

    async def upgrade(self, request: Request) -> Response:
        """Run the upgrade canary for another binary (`llama-supervisor upgrade`): the comparison, and whether it
        switched. Answers when the canary is over (a llama-server start and the golden set)."""
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        binary, mid, dry_run = body.get("binary"), body.get("model"), body.get("dry_run", False)
        if not isinstance(binary, str) or not binary.startswith("/"):
            return _bad("binary: an absolute path to the new llama-server is required", "binary")
        if mid is not None and not isinstance(mid, str):
            return _bad("model: a model id (a string), or leave it out for the default", "model")
        if not isinstance(dry_run, bool):
            return _bad("dry_run: true or false", "dry_run")
        found = self._model(mid)
        if isinstance(found, Response):
            return found
        target = self.upgrades.targets.get(found.id) if self.upgrades is not None else None
        if target is None or not found.resident or not found.runner.ready:
            return error_response(409, f"model '{found.id}' is not ready ({found.state_word()}): load it first",
                                  "conflict_error")
        assert self.upgrades is not None
        outcome = await self.upgrades.try_binary(target, binary, dry_run=dry_run)
        return JSONResponse({"model": found.id, "binary": binary, **outcome})

    async def admin_drain(self, request: Request) -> Response:
        """POST: leave the balancer's pool (/health 503, agent `drain`) while serving on; DELETE: come back.
        For scripts such as deploy/rolling-upgrade.py; a shutdown's drain is never ended here."""
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        reason = body.get("reason") or "operator"
        if not isinstance(reason, str):
            return _bad("reason: a string", "reason")
        why = f"admin: {reason}"[:100]
        if request.method == "POST":
            self.drain.begin(why)
        else:
            self.drain.end(why)
        return JSONResponse({"draining": self.drain.reason, "in_flight": self.pool.in_flight()})


def _bad(message: str, param: str | None = None) -> Response:
    """400 in OpenAI's shape; `param` names the body's field at fault."""
    return JSONResponse(error_doc(400, message, "invalid_request_error", param=param), status_code=400)


async def _json_object(request: Request) -> dict[str, Any] | Response:
    """The request's JSON object; an empty body is an empty object."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _bad(f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _bad("the body must be a JSON object")
    return body
