"""Readiness polling, against a mocked /health (respx): when it polls, not what llama-server says."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import respx

from supervisor.child.readiness import MIN_POLL_GAP_S, NotReady, wait_healthy

URL = "http://127.0.0.1:9"


def child(returncode: int | None = None) -> SimpleNamespace:
    """What wait_healthy reads of a Child: exit status, last output time, the log-line event."""
    return SimpleNamespace(returncode=returncode, last_output=time.monotonic(), printed=asyncio.Event())


@respx.mock
async def test_a_log_line_brings_the_next_poll_forward() -> None:
    ready = False
    route = respx.get(f"{URL}/health").mock(side_effect=lambda _req: httpx.Response(200 if ready else 503))
    c = child()
    async with httpx.AsyncClient() as client:
        # Intervals of 30 s: without the log-line wakeup this would take at least that long.
        task = asyncio.ensure_future(wait_healthy(client, URL, c, stall_s=60, max_s=120, interval_s=30,
                                                  max_interval_s=30))
        await asyncio.sleep(0.1)
        assert not task.done() and route.call_count == 1  # polled once (503), now waiting out the interval
        ready = True
        c.printed.set()  # llama-server's "model loaded" line
        waited = await asyncio.wait_for(task, 5)
    assert route.call_count == 2 and waited < 5  # the second poll came with the line, not after 30 s


@respx.mock
async def test_a_burst_of_log_lines_is_not_a_burst_of_probes() -> None:
    polled: list[float] = []

    class Recording(httpx.AsyncClient):
        async def get(self, *args: Any, **kwargs: Any) -> httpx.Response:
            polled.append(time.monotonic())  # when wait_healthy sends a probe (its own clock reading, to the µs)
            return await super().get(*args, **kwargs)

    respx.get(f"{URL}/health").mock(return_value=httpx.Response(503))
    c = child()

    async def chatter() -> None:
        for _ in range(200):  # 200 lines in ~0.2 s, like tensor loading
            c.last_output = time.monotonic()
            c.printed.set()
            await asyncio.sleep(0.001)
        c.returncode = 1
        c.printed.set()  # the pipes close when it exits

    async with Recording() as client:
        noise = asyncio.ensure_future(chatter())
        with pytest.raises(NotReady, match="exited with code 1"):
            await asyncio.wait_for(wait_healthy(client, URL, c, stall_s=60, max_s=120, interval_s=30,
                                                max_interval_s=30), 5)
        await noise
    # Probes keep their gap however fast lines come (on a loaded machine lines may come slower than the gap:
    # then a probe per line is right, so the count alone proves nothing).
    gaps = [b - a for a, b in itertools.pairwise(polled)]
    assert len(polled) >= 2 and min(gaps) >= MIN_POLL_GAP_S * 0.99, gaps


@respx.mock
async def test_no_output_and_no_health_is_a_stall() -> None:
    respx.get(f"{URL}/health").mock(side_effect=httpx.ConnectError("refused"))
    async with httpx.AsyncClient() as client:
        with pytest.raises(NotReady, match="no output for 0s"):
            await wait_healthy(client, URL, child(), stall_s=0.2, max_s=10, interval_s=0.01)
