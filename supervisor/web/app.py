"""The supervisor's HTTP face: one ASGI app on every box. A path check picks the supervisor's own routes, the
ops page or the proxied API, with the key each side needs in front."""

from __future__ import annotations

from ..models.pool import Pool
from ..telemetry.metrics import BoxMetrics
from .api.front import Api
from .auth import Keys
from .errors import Receive, Scope, Send
from .ops import page as ui
from .ops.activity import owns as owns_activity
from .ops.routes import ADMIN_PATHS, ADMIN_PREFIX, API_OWN, OPEN_PATHS, Own


class App:
    def __init__(self, pool: Pool, api: Api, own: Own, ops: ui.Ops, keys: Keys, metrics: BoxMetrics) -> None:
        self.pool, self.api, self.own, self.ops, self.keys, self.metrics = pool, api, own, ops, keys, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets; lifespan is handled by the daemon itself
        path = scope["path"]
        page = ui.owns(path)
        if path in OPEN_PATHS or (page and not ui.needs_admin(path)):
            await (self.ops if page else self.own.app)(scope, receive, send)
            return
        admin = page or path in ADMIN_PATHS or path.startswith(ADMIN_PREFIX) or owns_activity(path)
        if await self.keys.refuse(scope, send, admin=admin):
            self.metrics.front_requests.labels("admin" if admin else "other", "401").inc()
            if not admin and path not in API_OWN:
                self.api.unauthorized(scope, self.keys.message(admin))
            return
        if page:
            await self.ops(scope, receive, send)
        elif admin or (path in API_OWN and scope["method"] == "GET"):
            await self.own.app(scope, receive, send)
        else:
            await self.api(scope, receive, send)
