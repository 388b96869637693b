"""The upstream gate: at most `limit` requests go to llama-server at once; the rest wait here, in order.

llama-server serves HTTP with a fixed set of threads (parallel + 4 at least) and runs `parallel` slots;
requests beyond the slots only queue inside it, each pinning a thread. With every thread taken by long
requests, its /health probe queues too, and liveness would kill a server that is working. So the
proxy sends at most parallel + 2 (settings: upstream_max) and keeps the rest here, where waiting is
bounded (queue_wait_s) and measured (llama_supervisor_upstream_waiting, llama_supervisor_queue_wait_seconds).
"""

from __future__ import annotations

import asyncio
from collections import deque

from ...spec.profile import Profile
from ...spec.settings import Config
from ...telemetry.metrics import Metrics


def upstream_limit(cfg: Config, profile: Profile) -> int:
    """Requests llama-server gets at once: its slots (4 when the profile leaves `parallel` to llama-server), plus
    two queued inside it so a slot never idles between requests; that leaves two of its HTTP threads for probes."""
    return cfg.upstream_max or (profile.parallel or 4) + 2


class Gate:
    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.metrics = metrics
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.limit = 1
        self.set_limit(limit)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.metrics.upstream_limit.set(self.limit)
        self._wake()

    async def acquire(self, timeout_s: float) -> bool:
        """A slot within `timeout_s` (True), or False. The caller must release() a slot it got."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.metrics.upstream_waiting.inc()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(fut)
            return True
        except TimeoutError:
            if fut.done():  # granted just as the time ran out: take it after all
                return True
            fut.cancel()
            return False
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, but its request is gone: pass the slot on
            else:
                fut.cancel()
            raise
        finally:
            self.metrics.upstream_waiting.dec()
            if fut in self._waiters:
                self._waiters.remove(fut)

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self.active < self.limit and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)
