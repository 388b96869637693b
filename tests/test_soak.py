"""Under load: many clients, streaming and not, while llama-server is killed from outside at random; and many
long requests with a short liveness interval. The real llama-server throughout."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path

import httpx
import psutil
from support import running, wait_for

from supervisor.web.api.proxy import KEEPALIVE_IDLE

SOAK_S = 35.0
KILLS = 4


async def _client(c: httpx.AsyncClient, n: int, stream: bool, stop: float, out: list[tuple[str, str]]) -> None:
    i = 0
    while time.monotonic() < stop:
        i += 1
        body = {"messages": [{"role": "user", "content": f"client {n} request {i}"}], "max_tokens": 4,
                "ignore_eos": True, "stream": stream}
        try:
            if not stream:
                r = await c.post("/v1/chat/completions", json=body)
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4:
                    out.append(("ok", ""))
                else:
                    err = r.json()["error"]  # every failure is the supervisor's clean JSON
                    assert r.status_code in (502, 503) and err["code"] == r.status_code and err["message"], r.text
                    out.append(("json", f"{r.status_code} {err['message'][:80]}"))
            else:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        err = r.json()["error"]
                        assert r.status_code in (502, 503) and err["code"] == r.status_code, r.text
                        out.append(("json", f"{r.status_code} {err['message'][:80]}"))
                        continue
                    events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
                if events and events[-1] == "[DONE]":
                    out.append(("ok", ""))
                else:
                    last = json.loads(events[-1])  # a stream that could not be carried over: an SSE error event
                    assert last["error"]["code"] == 502, events[-1]
                    out.append(("cut", last["error"]["message"][:80]))
        except httpx.HTTPError as exc:
            out.append(("transport", repr(exc)))


async def test_soak_with_random_kills(tmp_path: Path, write_profile) -> None:
    profile = write_profile(parallel=4)
    async with running(tmp_path, profile, queue_wait_s=30, backoff_cap_s=0.5) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        await asyncio.sleep(0.3)
        baseline = asyncio.all_tasks()
        results: list[tuple[str, str]] = []
        stop = time.monotonic() + SOAK_S
        clients = [asyncio.ensure_future(_client(c, n, stream=n < 3, stop=stop, out=results)) for n in range(12)]
        pids: list[int] = []
        rng = random.Random(11)
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(4.0, SOAK_S / KILLS - 1.0))
            await wait_for(lambda: d.default.runner.ready, timeout=30, what="ready before the next kill")
            pid = d.default.runner.child.pid
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*clients)
        await wait_for(lambda: d.default.runner.ready, timeout=30, what="serving again after the soak")
        ok = sum(1 for kind, _ in results if kind == "ok")
        failures = [r for r in results if r[0] != "ok"]
        assert not [r for r in failures if r[0] == "transport"], failures
        assert not [r for r in failures if r[0] == "cut"], failures  # a stream cut by a kill goes on on the next child
        assert ok / len(results) >= 0.99, f"{ok}/{len(results)} succeeded; failures: {failures}"
        assert d.default.runner.machine.restarts == KILLS and not d.default.runner.machine.crash_loop
        assert (await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 2})).status_code == 200
        # Nothing left behind: tasks back to the baseline, few idle upstream connections, no orphan.
        await wait_for(lambda: d.default.in_flight == 0 and d.proxy_of().gate.active == 0, what="requests finished")
        try:
            await wait_for(lambda: len(asyncio.all_tasks()) <= len(baseline), timeout=10, what="task count")
        except AssertionError:
            extra = [repr(t.get_coro()) for t in asyncio.all_tasks() if t not in baseline]
            raise AssertionError(f"tasks leaked: {extra}") from None
        assert len(d.proxy_of().upstream.connections) <= KEEPALIVE_IDLE
        print(f"soak: {len(results)} requests, {ok} ok, failures: {failures}")
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not [p for p in psutil.Process().children(recursive=True) if "llama-server" in p.name()]


async def test_liveness_never_kills_a_busy_server(tmp_path: Path, write_profile) -> None:
    """Many long non-streaming requests at once (no byte flows until each ends) with a short liveness interval:
    the upstream gate keeps llama-server's HTTP threads free for the probe, and progress counts as life."""
    profile = write_profile(parallel=1, ctx_size=2048)
    async with running(tmp_path, profile, liveness_interval_s=0.2, liveness_timeout_s=0.5, liveness_failures=2,
                       queue_wait_s=120) as d, httpx.AsyncClient(base_url=d.url, timeout=180) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 800, "ignore_eos": True}
        tasks = [asyncio.ensure_future(c.post("/v1/chat/completions", json=body)) for _ in range(10)]
        peak = 0
        while not all(t.done() for t in tasks):
            peak = max(peak, d.proxy_of().gate.active)
            assert d.proxy_of().gate.active <= d.proxy_of().gate.limit == 3  # parallel 1 + 2
            await asyncio.sleep(0.05)
        assert [t.result().status_code for t in tasks] == [200] * 10
        assert d.default.runner.machine.restarts == 0 and d.default.runner.machine.gen == 1
        assert peak == 3
