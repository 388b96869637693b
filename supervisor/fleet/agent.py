"""HAProxy's agent check, served: a small TCP listener that answers one line per connection.

HAProxy connects every `agent-inter`, reads one line and closes. The answer (core/agent.py) carries a
weight from llama-server's free slots, or `drain` / `maint` while the box leaves the pool or restarts,
so the balancer sends new work where slots are idle. Off unless `agent_port` is set. What it reports comes
from a callable: RunnerLoad for one model, pool_status.agent_load for several.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httpx
import structlog

from ..child.runner import Runner
from ..core.agent import Load, reply
from ..core.lifecycle import State
from .drain import Drain

log = structlog.get_logger("agent")
# HAProxy closes as soon as it has the line; a peer that never does is dropped after this.
PEER_CLOSE_S = 2.0


class AgentListener:
    def __init__(self, load: Callable[[], Load], host: str, port: int) -> None:
        self.load, self.host, self.port = load, host, port
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Raises OSError when the address is taken."""
        self._server = await asyncio.start_server(self._answer, self.host, self.port, reuse_address=True)
        self.address = self._server.sockets[0].getsockname()[:2]
        log.info("agent_listening", host=self.address[0], port=self.address[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        closer = getattr(self.load, "close", None)
        if closer is not None:
            await closer()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(reply(self.load()).encode())
            await writer.drain()
            # Let HAProxy close first: closing with its bytes (agent-send) unread would reset the connection.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PEER_CLOSE_S):
                    while await reader.read(4096):
                        pass
        except OSError:
            pass  # HAProxy went away first: nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class RunnerLoad:
    """One model's load for the agent: its state, the drain, and llama-server's own slot count."""

    def __init__(self, runner: Runner, drain: Drain, in_flight: Callable[[], int]) -> None:
        self.runner, self.drain, self.in_flight = runner, drain, in_flight
        self._slots: tuple[int, int] | None = None  # (child generation, llama-server's total_slots)
        self._asking: asyncio.Task[None] | None = None

    def __call__(self) -> Load:
        return Load(self.runner.machine.state, self.drain.reason, self._total_slots(), self.in_flight())

    async def close(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
            await asyncio.gather(self._asking, return_exceptions=True)

    def _total_slots(self) -> int | None:
        """llama-server's own slot count (/props), asked once per child; the profile's `parallel` until then."""
        r = self.runner
        gen = r.machine.gen
        if self._slots is not None and self._slots[0] == gen:
            return self._slots[1]
        if r.machine.state is State.READY and (self._asking is None or self._asking.done()):
            self._asking = asyncio.ensure_future(self._ask_slots(gen))
        return r.loaded.profile.parallel

    async def _ask_slots(self, gen: int) -> None:
        url = self.runner.child_url
        if url is None:
            return
        try:
            resp = await self.runner.http.get(f"{url}/props", timeout=2.0)
            total = int(resp.json()["total_slots"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("agent_slots_unknown", error=repr(exc))
            return
        if self.runner.machine.gen == gen and total > 0:
            self._slots = (gen, total)
