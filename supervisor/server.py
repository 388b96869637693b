"""Wiring: settings + profile → runner, proxy and HTTP server; signals, systemd notify and watchdog; shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import structlog
import uvicorn

from . import status
from .api import App
from .config import Config
from .proxy import Proxy
from .reload import Reloader, load_checked
from .runner import Runner
from .sdnotify import Notifier

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


async def serve(cfg: Config, profile_path: Path, settings_file: Path | None = None) -> int:
    loaded = await asyncio.to_thread(load_checked, profile_path)
    notifier = Notifier()
    runner = Runner(cfg, loaded, notifier=notifier)
    runner.metrics.attach_sampler(lambda: status.sample(runner))
    proxy = Proxy(runner)
    reloader = Reloader(runner, profile_path, settings_file)
    app = App(runner, proxy, reloader)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    server = _Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, http="httptools",
                                    timeout_graceful_shutdown=int(cfg.drain_s) or 1, server_header=False))
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        log.info("signal", signal=sig.name, action="shutdown")
        notifier.send("STOPPING=1")
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload("SIGHUP")))

    log.info("listening", url=f"http://{host}:{port}", profile=str(profile_path), binary=loaded.caps.binary,
             llama_server_version=loaded.caps.version)
    background = [asyncio.ensure_future(reloader.watch())]
    if notifier.watchdog_s:
        background.append(asyncio.ensure_future(_watchdog(notifier)))
    await runner.start()
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await runner.stop()
        await proxy.aclose()
        notifier.close()
        log.info("stopped")
    return 0


async def _watchdog(notifier: Notifier) -> None:
    """Pings from the event loop itself, so a hung loop stops them and systemd restarts us."""
    assert notifier.watchdog_s is not None
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(notifier.watchdog_s / 3)
