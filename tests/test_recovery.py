"""Surviving crashes with the real llama-server: kills, hangs, restarts, bad inputs, and the OOM ladder."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
from pathlib import Path

import httpx
import pytest
from doubles.oom_llama_server import write_double
from support import metric, running, wait_for

from supervisor.core.lifecycle import Spawn
from supervisor.web.api.proxy import KEEPALIVE_IDLE

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_sigkill_during_stream_ends_stream_and_recovers(tmp_path: Path, write_profile) -> None:
    """A stream that cannot be carried over to the next child (a grammar: its state would start again; streams
    that can are in test_resume_live) ends with an SSE error event; the next request is served."""
    async with running(tmp_path, write_profile(parallel=1)) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid = d.default.runner.child.pid
        body = {**CHAT, "max_tokens": 100000, "stream": True, "ignore_eos": True, "grammar": "root ::= [a-z]+"}
        lines = []
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 5:
                    os.kill(pid, signal.SIGKILL)
        last = json.loads(lines[-1].removeprefix("data: "))
        assert last["error"]["code"] == 502 and "cut" in last["error"]["message"]
        await wait_for(lambda: d.default.runner.ready and d.default.runner.child is not None and d.default.runner.child.pid != pid,
                       what="ready again")
        # The backoff timer fired and left the runner; the new child's stable timer (60 s) replaced the old one's.
        assert list(d.default.runner._timers) == ["stable"]
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        st = (await c.get("/status")).json()
        assert st["last_exit"]["signal"] == "SIGKILL"
        assert st["last_exit"]["cause"] == "crashed"  # a SIGKILL from outside is never guessed to be oom_host
        assert st["restarts"] == 1


async def test_sigstop_is_detected_as_unresponsive(tmp_path: Path, write_profile) -> None:
    """The whole process stopped: /health does not answer either (a hung loop alone is `wedged`: test_liveness)."""
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid = d.default.runner.child.pid
        os.kill(pid, signal.SIGSTOP)
        await wait_for(lambda: d.default.runner.machine.last_exit is not None, timeout=15, what="unresponsive detection")
        assert d.default.runner.machine.last_exit.cause.value == "unresponsive"
        assert "liveness" in d.default.runner.machine.last_exit.detail
        await wait_for(lambda: d.default.runner.ready, what="ready again")
        assert d.default.runner.child.pid != pid
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_requests_during_restart_are_held_and_succeed(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.post("/admin/restart")
        assert r.status_code == 202
        assert not d.default.runner.ready
        results = await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(6)))
        assert [r.status_code for r in results] == [200] * 6
        assert d.default.runner.machine.restarts == 1


async def test_queue_bound_answers_503_with_retry_after(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile(), queue_max=0) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        await c.post("/admin/restart")
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "waiting" in r.json()["error"]["message"]


async def test_request_cut_before_response_is_retried(tmp_path: Path, write_profile) -> None:
    """The child dies after the request was sent but before any response byte: the proxy retries once."""
    profile = write_profile(parallel=1, ctx_size=4096)
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid = d.default.runner.child.pid
        # Long enough to be killed before its (non-streamed) answer; 4000 tokens, twice, outlasted the client's
        # 60 s on the shared 2-core CI box.
        long = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1000, "ignore_eos": True})
        task = asyncio.ensure_future(long)
        await wait_for(lambda: d.default.in_flight == 1, what="request in flight")
        await asyncio.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        r = await task
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1000
        assert d.default.runner.child.pid != pid


async def test_port_in_use_then_freed(tmp_path: Path, write_profile) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    async with running(tmp_path, write_profile(port=port), backoff_base_s=0.2) as d:
        await wait_for(lambda: d.default.runner.machine.last_exit is not None, what="first exit")
        assert d.default.runner.machine.last_exit.cause.value == "port_in_use"
        blocker.close()
        await wait_for(lambda: d.default.runner.ready, what="ready once the port is free")


async def test_binary_missing_fails_with_path(tmp_path: Path, write_profile, llama_server: str) -> None:
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    shutil.copy2(llama_server, binary)
    async with running(tmp_path, write_profile(binary=str(binary))) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        binary.unlink()
        await c.post("/admin/restart")
        await wait_for(lambda: d.default.runner.machine.state.value == "failed", what="failed")
        h = await c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "failed"
        assert str(binary) in h.json()["reason"]
        st = (await c.get("/status")).json()
        assert st["last_exit"]["cause"] == "spawn_failed"


async def test_crash_loop_backs_off_and_never_gives_up(tmp_path: Path, write_profile, llama_server: str) -> None:
    """A child that keeps dying puts the supervisor in a crash loop (its own reason, a growing backoff),
    never in failed: once the cause goes away it serves again by itself, with nobody calling /admin/restart."""
    flaky = tmp_path / "flaky.sh"
    flag = tmp_path / "healthy"
    flaky.write_text(f"#!/bin/sh\n[ -e {flag} ] && exec {llama_server} \"$@\"\n"
                     f"case \"$1\" in --help|--version) exec {llama_server} \"$1\";; esac\n"
                     "echo 'segfault soon' >&2; kill -SEGV $$\n")
    flaky.chmod(0o755)
    async with running(tmp_path, write_profile(binary=str(flaky)), breaker_failures=3, backoff_base_s=0.02,
                       backoff_cap_s=0.2, crash_loop_cap_s=0.8) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.machine.crash_loop and d.default.runner.machine.attempt >= 5, what="crash loop")
        st = (await c.get("/status")).json()
        assert st["state"] == "backoff" and st["crash_loop"] is True
        assert st["reason"].startswith("crash loop: ") and st["last_exit"]["cause"] == "crashed"
        assert metric((await c.get("/metrics")).text, "crash_loop") == 1.0
        h = await c.get("/health")
        assert h.status_code == 503 and h.json()["reason"].startswith("crash loop")
        flag.touch()
        await wait_for(lambda: d.default.runner.ready, what="ready again without an operator")
        assert d.default.runner.machine.history[-1].dst.value == "ready"


@pytest.mark.parametrize("mode", ["load", "compute"])
async def test_oom_ladder_with_real_server_at_the_end(tmp_path: Path, write_profile, llama_server: str,
                                                     mode: str) -> None:
    record = tmp_path / "layers.txt"
    double = write_double(tmp_path / "llama-server", llama_server, limit=1, mode=mode, record=record)
    profile = write_profile(binary=str(double), n_gpu_layers=99)
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready after the ladder")
        # The tiny model has 4 layers (+ output): 99 → min(99, 5) halved → 2 → 1.
        assert record.read_text().split() == ["99", "2", "1"]
        st = (await c.get("/status")).json()
        assert st["settings"]["effective"]["n_gpu_layers"] == 1
        assert st["settings"]["profile"]["n_gpu_layers"] == 99
        assert "gpu_layers" in st["settings"]["adjustment"]
        assert st["last_exit"]["cause"] == f"oom_{mode}"
        assert st["argv"][st["argv"].index("--n-gpu-layers") + 1] == "1"
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
    # A new supervisor with the same state directory starts with what worked.
    record.write_text("")
    async with running(tmp_path, profile) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready with learned settings")
        assert record.read_text().split() == ["1"]
        assert "resumed" in (d.default.runner.machine.adjustment or "")
        # An operator reset goes back to the profile's value (and walks the ladder again).
        d.default.runner.restart("operator", reset=True)
        await wait_for(lambda: d.default.runner.ready and record.read_text().split()[-1] == "1" and
                       len(record.read_text().split()) == 4, what="ladder walked again")
        assert record.read_text().split() == ["1", "99", "2", "1"]


async def test_restart_while_the_next_child_is_being_spawned(tmp_path: Path, write_profile) -> None:
    """A second restart that lands between Spawn and the process existing must still stop that child."""
    async with running(tmp_path, write_profile()) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        loop = asyncio.get_running_loop()
        perform = d.default.runner._perform

        def perform_and_interrupt(action) -> None:
            perform(action)
            if isinstance(action, Spawn) and action.gen == 2:
                # Runs right after the spawn task's first step: the gen-2 process does not exist yet.
                loop.call_soon(d.default.runner.restart, "second")

        d.default.runner._perform = perform_and_interrupt  # type: ignore[method-assign]
        d.default.runner.restart("first")
        await wait_for(lambda: d.default.runner.ready and d.default.runner.machine.gen == 3, what="ready after two restarts")
        assert d.default.runner.driver.gen == 3  # the child that runs is the last one spawned


async def test_no_tasks_or_connections_leak(tmp_path: Path, write_profile) -> None:
    """Traffic, abandoned streams and a restart leave the task count and the upstream pool where they were."""
    async with running(tmp_path, write_profile()) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
            await c.post("/v1/chat/completions", json=CHAT)
        await asyncio.sleep(0.2)
        baseline = asyncio.all_tasks()
        for round_ in range(3):
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(8)))
                body = {**CHAT, "max_tokens": 2000, "stream": True, "ignore_eos": True}
                for _ in range(3):  # streams the client walks away from
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for _line in r.aiter_lines():
                            break
            if round_ == 1:
                d.default.runner.restart("leak check")
                await wait_for(lambda: d.default.runner.ready and d.default.runner.machine.gen == 2, what="restart")
        await wait_for(lambda: d.default.in_flight == 0, what="requests finished")
        # A request's server-side task ends a moment after its last byte, later on a loaded box; a leak never does.
        try:
            await wait_for(lambda: len(asyncio.all_tasks()) <= len(baseline), timeout=10, what="task count")
        except AssertionError:
            extra = [f"{t.get_coro()!r} at {t.get_stack(limit=1)}" for t in asyncio.all_tasks() if t not in baseline]
            raise AssertionError(f"{len(asyncio.all_tasks())} tasks, baseline {len(baseline)}; new: {extra}") from None
        # Few idle upstream connections: each one pins a llama-server HTTP thread (see proxy.KEEPALIVE_IDLE).
        assert len(d.proxy_of().upstream.connections) <= KEEPALIVE_IDLE
