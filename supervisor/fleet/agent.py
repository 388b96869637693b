"""HAProxy's agent check, served: a small TCP listener that answers one line per connection.

HAProxy connects every `agent-inter`, reads one line and closes. The answer (core/agent.py) carries a
weight from llama-server's free slots, or `drain` / `maint` while the box leaves the pool or restarts,
so the balancer sends new work where slots are idle. Off unless `agent_port` is set. What it reports comes
from a callable (models/status.py: agent_load).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from ..core.agent import Load, reply

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
