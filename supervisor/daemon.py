"""Wiring: settings + profiles → the pool, its web face and background tasks; signals, systemd notify and the
watchdog; shutdown. One path for every box: a single profile is a pool of one model."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from .core.lifecycle import State
from .fleet.drain import Drain
from .host.sdnotify import Notifier
from .models import status
from .models.canary_hooks import ModelTarget, reporter
from .models.catalog import scan
from .models.model import Model
from .models.pool import Pool
from .models.upgrade import Upgrades
from .models.watch import Reloader
from .spec.loaded import load_checked
from .spec.settings import Config
from .telemetry.activity import Activity
from .telemetry.logring import RING
from .telemetry.metrics import BoxMetrics
from .web.api.front import Api
from .web.api.proxy import Proxy
from .web.app import App
from .web.auth import Keys
from .web.errors import JsonGuard
from .web.ops.page import Ops
from .web.ops.routes import Own
from .web.protocol import protocol_class

# HAProxy's agent check is imported where it is set up, only when the settings ask for it.
if TYPE_CHECKING:
    from .fleet.agent import AgentListener

log = structlog.get_logger("server")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The supervisor owns signal handling: it must stop the child before the process exits.
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Daemon:
    """One supervisor: the pool, its HTTP server and background tasks, started and stopped as a unit."""

    def __init__(self, cfg: Config, profile_path: Path, settings_file: Path | None = None,
                 notifier: Notifier | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.cfg, self.profile_path, self.settings_file = cfg, profile_path, settings_file
        self.overrides = overrides or {}  # command-line values: they win on every reload too
        self.notifier = notifier or Notifier()
        self.url = ""
        self._serving: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self.drain = Drain()
        self.agent: AgentListener | None = None
        self._notice: asyncio.TimerHandle | None = None
        self._stopping = False

    async def prepare(self) -> None:
        """Read the profiles and build the pool and the app, starting nothing. Raises ProfileError for a bad
        default profile."""
        cfg = self.cfg
        loaded = await asyncio.to_thread(load_checked, self.profile_path)
        # Every profile in profiles_dir is a model this box offers; without one, the default alone.
        folder = Path(cfg.profiles_dir) if cfg.profiles_dir is not None else None
        catalog = await asyncio.to_thread(scan, folder, loaded)
        # Each model runs its last good llama-server build; a new one at a profile's path gets a canary first.
        self.upgrades = upgrades = Upgrades(cfg)
        await upgrades.resolve_catalog(catalog)
        self.metrics = metrics = BoxMetrics()
        self.pool = pool = Pool(cfg, catalog, loaded.profile.name, notifier=self.notifier, metrics=metrics)
        metrics.attach_sampler(lambda: status.sample(pool))
        self.reloader = reloader = Reloader(pool, folder, loaded.path, self.settings_file, self.overrides,
                                            drain=self.drain)
        reloader.before_apply.append(upgrades.resolve_catalog)
        reloader.more_files.append(upgrades.watched)
        upgrades.reload, reloader.held = reloader.reload, upgrades.hold

        def follow(model: Model) -> None:
            upgrades.attach(ModelTarget(model, lambda mid, loaded, why: reloader.restart(mid, loaded, why, "upgrade")))

        for model in pool.models.values():
            follow(model)
        pool.on_model.append(follow)
        pool.on_forget.append(lambda model: upgrades.forget(model.id))
        keys = Keys(cfg.api_key, cfg.admin_key)
        self.activity = activity = Activity.from_settings(cfg, metrics.registry)
        self.api = api = Api(pool, metrics, activity)
        upgrades.slot = api.upstream_slot
        self.own = own = Own(pool, api, self.reloader, self.drain, activity, upgrades)
        self.ops = ops = Ops(pool.runners, own.page_models, RING,
                             key_ok=keys.admin_checker() if keys.admin_or_api else None,
                             sample_interval_s=cfg.sample_interval_s)
        for model in pool.models.values():
            ops.watch(model.runner)
        pool.on_model.append(lambda model: ops.watch(model.runner))
        pool.on_swap.append(ops.timeline.swapped)
        self.reloader.observers.append(ops.timeline.reloaded)
        upgrades.observers += [ops.timeline.upgraded, reporter(pool, metrics)]
        self.app = App(pool, api, own, ops, keys, metrics)
        log.info("models", profile=str(self.profile_path), models=list(catalog.models), binary=loaded.caps.binary,
                 llama_server_version=loaded.caps.version)

    async def start(self) -> None:
        """Raises ProfileError for a bad default profile and OSError when the address is taken."""
        await self.prepare()
        cfg, pool = self.cfg, self.pool
        sock = bind(cfg.host, cfg.port)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.server = self._server(self.app)
        log.info("listening", url=self.url)
        await self._start_agent(sock)
        self._background_tasks()
        # The pool first: its first load spawns llama-server while the activity log opens its database in a
        # thread (50-70 ms on a small box, taken from every cold start before); no request arrives before _serve.
        await pool.start()
        await self.activity.start()
        await self._serve(sock)

    async def _start_agent(self, sock: socket.socket) -> None:
        """HAProxy's agent check, when `agent_port` is set; the main socket is closed if its port is taken."""
        if self.cfg.agent_port is None:
            return
        from .fleet.agent import AgentListener  # only with an agent port (see the imports at the top)

        pool, drain = self.pool, self.drain
        self.agent = AgentListener(lambda: status.agent_load(pool, drain.reason), self.cfg.agent_host or self.cfg.host,
                                   self.cfg.agent_port)
        try:
            await self.agent.start()
        except OSError:
            sock.close()
            raise

    def _server(self, app: App) -> _Server:
        # ws="none": nothing here speaks WebSocket, so an upgrade is answered as the plain HTTP request it also
        # is (like any other upgrade), not by a WebSocket handshake that fails with a text 500; and the
        # websockets library is not imported on the event loop at every start.
        return _Server(uvicorn.Config(JsonGuard(app), lifespan="off", log_config=None, access_log=False, ws="none",
                                      http=protocol_class(self.cfg), server_header=False,
                                      timeout_graceful_shutdown=max(1, int(self.cfg.drain_s))))

    def _background_tasks(self) -> None:
        self._background.append(asyncio.ensure_future(self.reloader.watch()))
        if self.notifier.enabled:
            self._background.append(asyncio.ensure_future(_keepalive(self.notifier, self._state)))
        if self.ops.sampling:
            self._background.append(asyncio.ensure_future(self.ops.sampler.run()))

    async def _serve(self, sock: socket.socket) -> None:
        self._serving = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started and not self._serving.done():
            await asyncio.sleep(0.01)

    def _state(self) -> State:
        """The lifecycle state systemd hears about: the default model's (an unloaded default is not a starting
        service)."""
        default = self.pool.models.get(self.pool.default)
        return default.runner.machine.state if default is not None and default.resident else State.READY

    def in_flight(self) -> int:
        return self.pool.in_flight()

    @property
    def default(self) -> Model:
        """The default model: what requests without a model, /health and systemd follow."""
        return self.pool.models[self.pool.default]

    def proxy_of(self, mid: str | None = None) -> Proxy:
        return self.api.proxies[mid or self.pool.default]

    @property
    def closing(self) -> bool:
        return self.pool.stopping

    def request_stop(self) -> None:
        """Leave the balancer's pool first (/health 503, agent `drain`), then, `drain_notice_s` later, stop
        accepting and drain the requests in flight. A second request skips what is left of the notice."""
        again, self._stopping = self._stopping, True
        self.pool.shutting_down()
        self.drain.reason = "shutdown"  # whatever drain was on (a profile change), this one wins
        if not again:
            self.notifier.send("STOPPING=1")
            if self.cfg.drain_notice_s > 0:
                log.info("drain_notice", seconds=self.cfg.drain_notice_s, in_flight=self.in_flight())
                self._notice = asyncio.get_running_loop().call_later(self.cfg.drain_notice_s, self._stop_accepting)
                return
        self._stop_accepting()

    def _stop_accepting(self) -> None:
        if self._notice is not None:
            self._notice.cancel()
        log.info("drain", in_flight=self.in_flight())
        self.server.should_exit = True
        self.ops.stream.close()  # open log streams end, or the server would wait for them

    def track(self, coro: Coroutine[Any, Any, Any]) -> None:
        """A background job that stop() waits for (bounded by its cancellation)."""
        self._background.append(asyncio.ensure_future(coro))

    async def wait(self) -> None:
        if self._serving is not None:
            await asyncio.shield(self._serving)

    async def stop(self) -> None:
        """Stop accepting, drain requests in flight (bounded), stop the child, release everything."""
        self.request_stop()
        try:
            if self._serving is not None:
                await self._serving
        finally:
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self.upgrades.close()
            await self.pool.stop()
            await self.activity.stop()  # what is still queued is written first
            if self.agent is not None:  # last: it says `drain` until the very end
                await self.agent.close()
            self.notifier.close()
            log.info("stopped")


async def serve(cfg: Config, profile_path: Path, settings_file: Path | None = None,
                overrides: dict[str, Any] | None = None) -> int:
    daemon = Daemon(cfg, profile_path, settings_file, overrides=overrides)
    await daemon.start()
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        log.info("signal", signal=sig.name, action="shutdown")
        daemon.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    def on_hup() -> None:
        if daemon.closing:
            log.info("signal", signal="SIGHUP", action="ignored: shutting down")
            return
        log.info("signal", signal="SIGHUP", action="reload")
        daemon.track(daemon.reloader.reload("SIGHUP"))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await daemon.wait()
    await daemon.stop()
    return 0


async def _keepalive(notifier: Notifier, state: Callable[[], State]) -> None:
    """Watchdog pings and first-start extensions, from the event loop itself: a hung loop stops both, and
    systemd kills and restarts us within WatchdogSec (or one extension, while the first start goes on)."""
    while True:
        try:
            fields = notifier.keepalive_fields(state())
            if fields:
                notifier.send(*fields)
        except Exception as exc:  # noqa: BLE001  (a bug here must not stop the pings: systemd would kill us)
            log.error("keepalive_error", error=repr(exc))
            notifier.send("WATCHDOG=1")
        await asyncio.sleep(notifier.keepalive_period_s)
