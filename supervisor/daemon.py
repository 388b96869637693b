"""Wiring: settings + profile → runner, proxy and HTTP server; signals, systemd notify and watchdog; shutdown."""

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

from .child.runner import Runner
from .core.lifecycle import State
from .fleet.drain import Drain
from .host.sdnotify import Notifier
from .models import status
from .models.reload import Reloader
from .spec.loaded import Loaded, load_checked
from .spec.settings import Config
from .telemetry.logring import RING
from .web.api.proxy import Proxy
from .web.app import App, key_checker
from .web.errors import JsonGuard
from .web.ops.page import Ops
from .web.protocol import protocol_class

# Several models (profiles_dir) and HAProxy's agent check are imported where they are set up, only when the
# settings ask for them: a single-model supervisor (the common case) starts without loading them (start
# time and idle memory, benchmark P3/P6).
if TYPE_CHECKING:
    from .core.agent import Load
    from .fleet.agent import AgentListener
    from .models import watch as multi
    from .models.pool import Pool
    from .web.front import Front

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
    """One supervisor: runner, proxy, HTTP server and background tasks, started and stopped as a unit."""

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
        self.pool: Pool | None = None  # several models (profiles_dir); None: the one runner below
        self.reloader: Reloader | multi.FolderReloader

    async def start(self) -> None:
        """Raises ProfileError for a bad profile and OSError when the address is taken."""
        cfg = self.cfg
        loaded = await asyncio.to_thread(load_checked, self.profile_path)
        if cfg.profiles_dir is not None:  # every profile in the folder is a model this box offers
            await self._start_pool(loaded)
            return
        self.runner = runner = Runner(cfg, loaded, notifier=self.notifier)
        runner.metrics.attach_sampler(lambda: status.sample(runner))
        self.proxy = proxy = Proxy(runner)
        self.reloader = Reloader(runner, self.profile_path, self.settings_file, overrides=self.overrides,
                                 in_flight=lambda: proxy.in_flight, on_applied=proxy.sync_profile,
                                 drain=self.drain)
        self.ops = Ops(lambda: [runner], RING, has_admin_key=(cfg.admin_key or cfg.api_key) is not None,
                       key_ok=key_checker(cfg.admin_key or cfg.api_key), sample_interval_s=cfg.sample_interval_s)
        self.ops.watch(runner)
        self.reloader.observers.append(self.ops.reloaded)
        sock = bind(cfg.host, cfg.port)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.server = self._server(App(runner, self.proxy, self.reloader, self.drain, self.ops))
        log.info("listening", url=self.url, profile=str(self.profile_path), binary=loaded.caps.binary,
                 llama_server_version=loaded.caps.version)
        await self._start_agent(sock)
        self._background_tasks()
        await runner.start()
        await self._serve(sock)

    async def _start_pool(self, loaded: Loaded) -> None:
        from .models import pool_status
        from .models import watch as multi  # several models only (see the imports at the top)
        from .models.catalog import scan
        from .web.front import Front

        cfg = self.cfg
        catalog = await asyncio.to_thread(scan, Path(cfg.profiles_dir or "."), loaded)
        self.pool, self.reloader = pool, _ = multi.build(cfg, loaded, catalog, self.notifier, self.settings_file,
                                                         self.overrides)
        self.ops = Ops(pool.runners, RING, has_admin_key=cfg.admin_key is not None,
                       key_ok=key_checker(cfg.admin_key), sample_interval_s=cfg.sample_interval_s)
        pool.on_runner.append(self.ops.watch)
        pool.on_swap.append(self.ops.timeline.swapped)
        self.reloader.observers.append(self.ops.timeline.folder_reloaded)
        sock = bind(cfg.host, cfg.port)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.server = self._server(Front(pool, self.reloader, self.drain, self.ops))
        log.info("listening", url=self.url, profile=str(self.profile_path), models=pool.ids,
                 binary=loaded.caps.binary, llama_server_version=loaded.caps.version)
        await self._start_agent(sock, lambda: pool_status.agent_load(pool, self.drain.reason))
        self._background_tasks()
        await pool.start()
        await self._serve(sock)

    async def _start_agent(self, sock: socket.socket, load: Callable[[], Load] | None = None) -> None:
        """HAProxy's agent check, when `agent_port` is set; the main socket is closed if its port is taken.
        `load` is the pool's; None: the one runner's."""
        if self.cfg.agent_port is None:
            return
        from .fleet.agent import AgentListener, RunnerLoad  # only with an agent port (see the imports at the top)

        if load is None:
            proxy = self.proxy
            load = RunnerLoad(self.runner, self.drain, lambda: proxy.in_flight)
        self.agent = AgentListener(load, self.cfg.agent_host or self.cfg.host, self.cfg.agent_port)
        try:
            await self.agent.start()
        except OSError:
            sock.close()
            raise

    def _server(self, app: App | Front) -> _Server:
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
        """The lifecycle state systemd hears about: the one runner's, or the default model's (an unloaded
        default is not a starting service)."""
        if self.pool is None:
            return self.runner.machine.state
        slot = self.pool.slots.get(self.pool.default)
        default = slot.runner if slot is not None else None
        return default.machine.state if default is not None else State.READY

    def in_flight(self) -> int:
        return self.pool.in_flight() if self.pool is not None else self.proxy.in_flight

    @property
    def closing(self) -> bool:
        return self.pool.stopping if self.pool is not None else self.runner.closing

    def request_stop(self) -> None:
        """Leave the balancer's pool first (/health 503, agent `drain`), then, `drain_notice_s` later, stop
        accepting and drain the requests in flight. A second request skips what is left of the notice."""
        again, self._stopping = self._stopping, True
        if self.pool is not None:
            self.pool.shutting_down()
        else:
            self.runner.shutting_down()
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
            if self.pool is not None:
                await self.pool.stop()
            else:
                await self.runner.stop()
                await self.proxy.aclose()
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
