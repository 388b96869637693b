"""Liveness: restart a child that stopped working, and never one that is working.

Alive is not enough: llama-server answers `/health` from its HTTP threads, while generation runs in one
inference loop on its main thread (core/liveness.py). So a probe round asks both, at once: `/health`, and a
route through the loop's task queue (`/slots`, or `/metrics`). The loop is `wedged` when /health says ok and
the loop route gets no answer within `loop_timeout_s`, or answers that slots are processing while their work
(prompt tokens processed, tokens generated) has not moved for `loop_timeout_s`: the child is killed at once and
restarted. A `/health` that does not answer, `liveness_failures` rounds in a row, is `unresponsive`.

A round is sent while ready when nothing showed progress for `liveness_interval_s` (an idle child, or one
whose every answer stopped), or when a request in flight has had no byte for `stall_s` (a long prompt, or a
hung loop while /tokenize or /props still answer: the probe tells them apart). Progress is bytes from the
child on any proxied request (the proxy tells `Runner.progress`); a loop that looks stuck is not when
generated text flowed meanwhile. The proxy caps its upstream connections below llama-server's HTTP threads
(web/api/gate.py), so a probe always finds a thread.
The loop probe's round trip is the loop's latency: a metric and a chart, so a slowing loop shows early.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import structlog

from ..core.crash import Cause
from ..core.lifecycle import State, Unresponsive
from ..core.liveness import (
    Answers,
    Outcome,
    Work,
    judge,
    loop_route_unusable,
    loop_routes,
    pace,
    probe_due,
)

if TYPE_CHECKING:
    from .view import RunnerCore

log = structlog.get_logger("supervisor")


async def _get(http: httpx.AsyncClient, url: str, timeout_s: float) -> tuple[int | None, bytes]:
    """The answer's status and body; None when none came in time (or the connection failed)."""
    try:
        async with asyncio.timeout(timeout_s):
            resp = await http.get(url, timeout=timeout_s)
        return resp.status_code, resp.content
    except (httpx.HTTPError, TimeoutError):
        return None, b""


async def _status(http: httpx.AsyncClient, url: str, timeout_s: float) -> int | None:
    return (await _get(http, url, timeout_s))[0]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def work_from_slots(body: bytes) -> Work | None:
    """`GET /slots`: a list of slots with `is_processing`, `n_prompt_tokens_processed`, `next_token[0].n_decoded`."""
    try:
        slots = json.loads(body)
    except ValueError:
        return None
    if not isinstance(slots, list):
        return None
    busy, done = False, 0.0
    for slot in slots:
        if not isinstance(slot, dict):
            return None
        if slot.get("is_processing") is True:
            busy = True
            nxt = slot.get("next_token")
            decoded = nxt[0].get("n_decoded") if isinstance(nxt, list) and nxt and isinstance(nxt[0], dict) else 0
            done += _num(slot.get("n_prompt_tokens_processed")) + _num(decoded)
    return Work(busy, done)


_COUNTERS = ("llamacpp:n_decode_total", "llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total")


def work_from_metrics(body: bytes) -> Work | None:
    """`GET /metrics` (Prometheus text): `requests_processing` and the decode and token counters."""
    values: dict[str, float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("llamacpp:"):
            try:
                values[name] = float(value)
            except ValueError:
                continue
    if "llamacpp:requests_processing" not in values:
        return None
    return Work(values["llamacpp:requests_processing"] > 0, sum(values.get(k, 0.0) for k in _COUNTERS))


def work_from(route: str, body: bytes) -> Work | None:
    return work_from_metrics(body) if route == "/metrics" else work_from_slots(body)


def _cpu_seconds(pid: int) -> float | None:
    """Blocking (/proc): the child's CPU time so far, its threads together."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


async def probe_round(r: RunnerCore, url: str) -> tuple[Answers, float | None]:
    """One round: the loop route and /health at once; the loop's round trip time when it answered."""
    cfg, watch = r.cfg, r.loop_watch
    route = watch.routes[0] if watch.routes else None
    sent = time.monotonic()
    seen = (r.progress.last, r.progress.last_stream)
    loop_at: list[float] = []
    work: list[Work | None] = []

    async def ask_loop() -> int | None:
        status, body = await _get(r.http, f"{url}{route}", cfg.loop_timeout_s)
        loop_at.append(time.monotonic())
        work.append(work_from(route or "", body) if status == 200 else None)
        return status

    loop_task = asyncio.ensure_future(ask_loop()) if route is not None else None
    try:
        health = await _status(r.http, f"{url}/health", cfg.liveness_timeout_s)
        loop: int | None = None
        if loop_task is not None:
            if health == 200 or loop_task.done():
                loop = await loop_task
            if loop is None and health == 200:
                # The loop did not answer: is /health still ok now (a hung loop), or is the whole process gone?
                health = await _status(r.http, f"{url}/health", cfg.liveness_timeout_s)
    finally:
        if loop_task is not None and not loop_task.done():
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
    progressed = r.progress.last > seen[0]
    streamed = r.progress.last_stream > seen[1]
    still_s, still_cpu = 0.0, None
    if work and work[0] is not None:
        pid = r.child.pid if r.child is not None else None
        cpu = await asyncio.to_thread(_cpu_seconds, pid) if work[0].busy and pid is not None else None
        watch.pace = pace(watch.pace, work[0], loop_at[0], cpu)
        still_s, still_cpu = watch.pace.still_s(loop_at[0]), watch.pace.still_cpu_s(cpu)
    answers = Answers(health=health, loop=loop, asked_loop=route is not None, progressed=progressed,
                      streamed=streamed, still_s=still_s, still_cpu_s=still_cpu)
    latency = loop_at[0] - sent if loop is not None and loop_at and not loop_route_unusable(loop) else None
    if route is not None and loop_route_unusable(loop):
        watch.routes = watch.routes[1:]
        log.info("loop_probe_route", route=route, status=loop, next=watch.routes[0] if watch.routes else None)
    return answers, latency


async def liveness(r: RunnerCore) -> None:
    cfg = r.cfg
    failures, gen = 0, -1
    wait = cfg.liveness_interval_s
    while True:
        await asyncio.sleep(wait)
        wait = cfg.liveness_interval_s
        m = r.machine
        url = r.child_url
        if m.state is not State.READY or url is None:
            failures = 0
            continue
        if m.gen != gen:
            failures, gen = 0, m.gen
            r.loop_watch.reset(gen, loop_routes(r.argv))
        now = time.monotonic()
        idle_s, stalled_s = now - r.progress.last, r.progress.stalled_for(now)
        why = probe_due(idle_s, stalled_s, cfg.liveness_interval_s, cfg.stall_s)
        if why is None:
            failures = 0  # it showed life within the interval
            # Look again when a probe could first be due: an interval after the last byte, or a stall.
            stall_left = cfg.stall_s - stalled_s if r.progress.in_flight() else cfg.liveness_interval_s
            wait = max(0.05, min(cfg.liveness_interval_s - idle_s, stall_left))
            continue
        answers, latency = await probe_round(r, url)
        outcome = judge(answers, cfg.loop_timeout_s)
        watch = r.loop_watch
        watch.rounds += 1
        watch.outcomes[outcome.value] = watch.outcomes.get(outcome.value, 0) + 1
        r.metrics.loop_probes.labels(outcome.value).inc()
        if latency is not None:
            watch.latency_s, watch.answered_at = latency, time.monotonic()
            r.metrics.loop_latency.set(latency)
        if r.machine.gen != gen or r.machine.state is not State.READY:
            continue  # it went (or was restarted) while the probe waited: nothing to decide about
        if outcome is Outcome.WEDGED:
            route = watch.routes[0] if watch.routes else "?"
            if answers.loop is None:
                how = f"{route} not answered within {cfg.loop_timeout_s:g}s"
            else:
                cpu = "" if answers.still_cpu_s is None else f", {answers.still_cpu_s:.2f}s of CPU meanwhile"
                how = f"{route}: slots processing, no prompt batch or token for {answers.still_s:.1f}s{cpu}"
            detail = f"inference loop hung: {how} while /health answered 200 (probed because: {why})"
            log.warning("wedged", gen=gen, pid=r.child.pid if r.child else None, route=route, how=how,
                        timeout_s=cfg.loop_timeout_s, why=why, in_flight=r.traffic())
            r.dispatch(Unresponsive(time.monotonic(), gen, detail, Cause.WEDGED))
            failures = 0
        elif outcome is Outcome.FAILED:
            failures += 1
            if failures >= cfg.liveness_failures:
                how = f"/health answered {answers.health}" if answers.health is not None else "/health: no answer"
                r.dispatch(Unresponsive(time.monotonic(), gen, f"liveness: {failures} failed probes ({how})"))
                failures = 0
        else:
            failures = 0
