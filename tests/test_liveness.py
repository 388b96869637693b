"""Liveness with a REAL hang: llama-server's main thread (its inference loop) stopped with ptrace, its HTTP
threads still answering /health 200 (tests/thread_stop.py). The supervisor must find it `wedged` and restart it;
and it must never restart a child that is only busy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import structlog
from support import metric, running, wait_for
from thread_stop import ThreadStop

from supervisor.core.crash import Cause

KEY = {"Authorization": "Bearer sesame"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
# Fast probes for tests; loop_timeout_s well above a batch of the tiny model on this 2-core box (a few ms).
FAST = {"liveness_interval_s": 0.5, "loop_timeout_s": 2.0, "liveness_timeout_s": 1.0, "admin_key": "sesame"}


async def _hang(pid: int, url: str) -> ThreadStop:
    """Stop the inference loop (llama-server's main thread) where it holds no lock that /health needs.

    A stop can land inside malloc or another call that holds a lock the HTTP threads share (glibc's arena lock):
    then /health hangs too, which is a whole-process hang (`unresponsive`, see test_recovery), not the hang
    behind a healthy /health that this file is about. Such a stop is let go and taken again a moment later."""
    async with httpx.AsyncClient(timeout=0.3, limits=httpx.Limits(max_keepalive_connections=0)) as probe:
        for _ in range(20):
            stop = await asyncio.to_thread(ThreadStop, pid)
            try:
                codes = [(await probe.get(f"{url}/health")).status_code for _ in range(6)]
            except httpx.TimeoutException:
                codes = []
            if codes == [200] * 6:
                return stop
            await asyncio.to_thread(stop.release)
            await asyncio.sleep(0.05)
    raise AssertionError("could not stop llama-server's main thread with /health still answering")


async def test_hung_loop_of_an_idle_child_is_wedged_and_restarted(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile(), **FAST) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        await wait_for(lambda: d.default.runner.loop_watch.latency_s is not None, what="a first loop probe")
        pid, url = d.default.runner.child.pid, d.default.runner.child_url
        with structlog.testing.capture_logs() as logs:
            stop = await _hang(pid, url)
            try:
                t0 = time.monotonic()
                # The hang /health cannot see: llama-server itself says ok, the supervisor still says ready.
                assert (await c.get(f"{url}/health")).status_code == 200
                assert (await c.get("/health")).status_code == 200
                await wait_for(lambda: not d.default.runner.ready, timeout=15, what="the hung loop found")
                found_s = time.monotonic() - t0
                await wait_for(lambda: d.default.runner.ready and d.default.runner.child.pid != pid, timeout=30, what="ready again")
            finally:
                await asyncio.to_thread(stop.release)
        # Found within an interval plus the loop's timeout (plus the /health re-check and this box's jitter).
        assert found_s <= FAST["liveness_interval_s"] + FAST["loop_timeout_s"] + 1.5, found_s
        assert d.default.runner.machine.last_exit.cause is Cause.WEDGED
        st = (await c.get("/status", headers=KEY)).json()
        assert st["last_exit"]["cause"] == "wedged" and st["last_exit"]["signal"] == "SIGKILL"
        assert "/slots not answered" in st["last_exit"]["detail"] and "/health answered 200" in st["last_exit"]["detail"]
        assert [t["to"] for t in st["transitions"] if t["from"] == "ready"] == ["backoff"]
        assert next(t for t in st["transitions"] if t["from"] == "ready")["cause"] == "wedged"
        assert st["loop"]["route"] == "/slots"
        metrics = (await c.get("/metrics", headers=KEY)).text
        assert metric(metrics, "restarts_total", cause="wedged", model="test") == 1.0
        assert metric(metrics, "loop_probes_total", outcome="wedged", model="test") == 1.0
        assert "llama_supervisor_loop_latency_seconds" in metrics
        events = (await c.get("/ui/api/events", headers=KEY)).json()["events"]
        assert [e["cause"] for e in events if e["kind"] == "exit"] == ["wedged"]
        journal = [e for e in logs if e.get("event") in ("wedged", "child_exit")]
        assert [(e["event"], e.get("cause")) for e in journal] == [("wedged", None), ("child_exit", "wedged")]
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_hung_loop_under_eight_streams_is_found_and_new_requests_succeed(tmp_path: Path,
                                                                               write_profile) -> None:
    """Every slot streaming when the loop stops: no byte flows, the probe finds it, the child is restarted."""
    profile = write_profile(parallel=8, ctx_size=8192)
    async with running(tmp_path, profile, **FAST) as d, httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid = d.default.runner.child.pid
        body = {**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        started = asyncio.Event()
        seen = [0] * 8

        async def stream(i: int) -> list[str]:
            lines = []
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                        seen[i] += 1
                        if all(seen):
                            started.set()
            return lines

        tasks = [asyncio.ensure_future(stream(i)) for i in range(8)]
        await asyncio.wait_for(started.wait(), 30)
        stop = await _hang(pid, d.default.runner.child_url)
        try:
            t0 = time.monotonic()
            await wait_for(lambda: not d.default.runner.ready, timeout=15, what="the hung loop found under load")
            found_s = time.monotonic() - t0
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            await asyncio.to_thread(stop.release)
        assert found_s <= FAST["liveness_interval_s"] * 2 + FAST["loop_timeout_s"] + 1.5, found_s
        await wait_for(lambda: d.default.runner.machine.last_exit is not None, what="the exit examined")
        assert d.default.runner.machine.last_exit.cause is Cause.WEDGED
        assert all(lines for lines in results)
        await wait_for(lambda: d.default.runner.ready, what="ready again")
        replies = await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        assert d.default.runner.machine.gen == 2


async def test_a_long_generation_on_every_slot_is_never_restarted(tmp_path: Path, write_profile) -> None:
    """Long prompts (no byte while they are read) and hundreds of tokens on every slot, with probes sent at every
    quiet moment and a short loop timeout: the loop answers its probe between batches, so nothing is killed."""
    profile = write_profile(parallel=4, ctx_size=16384)
    quick = {**FAST, "liveness_interval_s": 0.2}
    async with running(tmp_path, profile, **quick) as d, httpx.AsyncClient(base_url=d.url, timeout=180) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        prompt = " ".join(f"w{i}" for i in range(600))  # ~3000 tokens with the tiny byte-level vocabulary
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 400, "ignore_eos": True}
        probes_before = d.default.runner.loop_watch.rounds
        streamed = {**body, "stream": True}
        tasks = [asyncio.ensure_future(c.post("/v1/chat/completions", json=body)) for _ in range(2)]
        tasks += [asyncio.ensure_future(c.post("/v1/chat/completions", json=streamed)) for _ in range(2)]
        replies = await asyncio.gather(*tasks)
        assert [r.status_code for r in replies] == [200] * 4, replies[0].text
        assert [r.json()["usage"]["completion_tokens"] for r in replies[:2]] == [400, 400]
        assert d.default.runner.machine.gen == 1 and d.default.runner.machine.restarts == 0
        watch = d.default.runner.loop_watch
        # Probes were sent while it worked (the test can fail).
        assert watch.rounds > probes_before + 2, watch.status(time.monotonic())
        # Answered through the loop every time; on a loaded box a batch can outlast the 2 s timeout, and then its
        # CPU time tells a long batch from a hang ("excused").
        assert set(watch.outcomes) <= {"alive", "excused"} and watch.outcomes.get("alive"), watch.outcomes


async def test_a_stalled_request_gets_the_loop_probed_while_other_answers_flow(tmp_path: Path, write_profile) -> None:
    """A client polling /tokenize (answered by the HTTP threads, so bytes keep coming) hides a hung loop from the
    idle rule; a stream with no byte for stall_s gets it probed anyway. The stream then goes on on the next child."""
    quick = {**FAST, "stall_s": 1.0}
    async with running(tmp_path, write_profile(parallel=1, ctx_size=8192), **quick) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=90) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid, url = d.default.runner.child.pid, d.default.runner.child_url
        lines: list[str] = []
        body = {**CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True}

        async def stream() -> None:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)

        async def poll() -> None:
            while True:
                assert (await c.post("/tokenize", json={"content": "hello"})).status_code == 200
                await asyncio.sleep(0.1)

        task = asyncio.ensure_future(stream())
        await wait_for(lambda: len(lines) >= 10, what="the stream under way")
        poller = asyncio.ensure_future(poll())
        stop = await _hang(pid, url)
        try:
            t0 = time.monotonic()
            await wait_for(lambda: not d.default.runner.ready, timeout=15, what="the hung loop found")
            found_s = time.monotonic() - t0
        finally:
            poller.cancel()
            await asyncio.to_thread(stop.release)
        await asyncio.wait_for(task, 90)
        assert found_s <= quick["stall_s"] + FAST["loop_timeout_s"] + FAST["liveness_interval_s"] + 1.5, found_s
        assert "a request has had no byte" in d.default.runner.machine.history[-1].detail or any(
            "a request has had no byte" in t.detail for t in d.default.runner.machine.history)
        assert lines[-1] == "data: [DONE]" and not [x for x in lines if '"error"' in x]
