"""Liveness: restart a child that stopped answering, and never one that is working.

Progress counts as life: bytes from the child on any proxied request, a completed request, an answered
probe (the proxy and the probes call `Runner.note_progress`). A probe is sent only when nothing showed
progress for a whole interval, and a failed probe does not count when progress came in meanwhile (a busy
server answers its requests before its probes). The proxy caps its upstream connections below
llama-server's HTTP threads (see web/api/proxy.py), so a probe always finds a thread.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx

from ..core.lifecycle import State, Unresponsive

if TYPE_CHECKING:
    from .runner import Runner


async def liveness(r: Runner) -> None:
    cfg = r.cfg
    failures, gen = 0, -1
    while True:
        await asyncio.sleep(cfg.liveness_interval_s)
        m = r.machine
        url = r.child_url
        if m.state is not State.READY or url is None:
            failures = 0
            continue
        if m.gen != gen:
            failures, gen = 0, m.gen
        sent = time.monotonic()
        if sent - r.last_progress < cfg.liveness_interval_s:
            failures = 0  # it showed life within the interval
            continue
        try:
            resp = await r.http.get(f"{url}/health", timeout=cfg.liveness_timeout_s)
            ok, why = resp.status_code == 200, f"/health answered {resp.status_code}"
        except httpx.HTTPError as exc:
            ok, why = False, f"/health: {type(exc).__name__}"
        if ok:
            r.note_progress()
            failures = 0
            continue
        if r.last_progress > sent:
            failures = 0  # its requests made progress while the probe waited: busy, not dead
            continue
        failures += 1
        if failures >= cfg.liveness_failures and r.machine.gen == gen and r.machine.state is State.READY:
            r.dispatch(Unresponsive(time.monotonic(), gen, f"liveness: {failures} failed probes ({why})"))
            failures = 0
