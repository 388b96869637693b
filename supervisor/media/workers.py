"""Image work, bounded: a few dedicated threads behind a semaphore, and a bounded wait for a turn.

Decoding and downscaling is CPU and memory heavy (a 12 MP photo is tens of MB while it is being resized). The
default thread pool would let every concurrent request decode at once; here at most `workers` images are in
memory at a time, and a request that cannot get a turn within `wait_s` is answered 503 with Retry-After instead
of piling up bodies. The event loop never runs image work.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..core.refusal import Rejected

T = TypeVar("T")


class ImageWorkers:
    def __init__(self, workers: int, wait_s: float, max_waiting: int) -> None:
        self.workers, self.wait_s, self.max_waiting = workers, wait_s, max_waiting
        self._executor: ThreadPoolExecutor | None = None  # started on first use: text-only boxes never pay for it
        self._turns = asyncio.Semaphore(workers)
        self.waiting = 0

    def _busy(self, why: str) -> Rejected:
        retry = max(1, math.ceil(self.wait_s))
        return Rejected(503, f"image processing is saturated ({why}); retry later", [(b"retry-after", str(retry).encode())])

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._turns.locked() and self.waiting >= self.max_waiting:
            raise self._busy(f"{self.waiting} requests with images are already waiting")
        self.waiting += 1
        try:
            await asyncio.wait_for(self._turns.acquire(), self.wait_s)
        except TimeoutError:
            raise self._busy(f"no turn within {self.wait_s:g} s") from None
        finally:
            self.waiting -= 1
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="image")
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._turns.release()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
