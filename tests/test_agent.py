"""The agent check's answers (HAProxy's agent protocol), as a table, and the listener that serves them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from support import running, wait_for

from supervisor.core.agent import MIN_WEIGHT_PCT, Load, reply, weight_pct
from supervisor.core.lifecycle import State
from supervisor.fleet.agent import AgentListener
from supervisor.spec.settings import Config

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(("load", "expected"), [
    # serving: the weight is the share of free slots
    (Load(State.READY, total_slots=4, in_flight=0), "ready 100%\n"),
    (Load(State.READY, total_slots=4, in_flight=1), "ready 75%\n"),
    (Load(State.READY, total_slots=4, in_flight=3), "ready 25%\n"),
    (Load(State.READY, total_slots=3, in_flight=1), "ready 67%\n"),
    # all slots busy (or more requests than slots): still in the pool, with the smallest share
    (Load(State.READY, total_slots=4, in_flight=4), f"ready {MIN_WEIGHT_PCT}%\n"),
    (Load(State.READY, total_slots=2, in_flight=9), f"ready {MIN_WEIGHT_PCT}%\n"),
    # slots not known yet: full weight while idle, the smallest share while busy
    (Load(State.READY, total_slots=None, in_flight=0), "ready 100%\n"),
    (Load(State.READY, total_slots=None, in_flight=2), f"ready {MIN_WEIGHT_PCT}%\n"),
    # leaving the pool: drain first (requests in flight go on), with the reason as a comment
    (Load(State.READY, draining="shutdown", total_slots=4), "drain #shutdown\n"),
    (Load(State.READY, draining="profile change: /etc/x y.yaml"), "drain #profile_change:_/etc/x_y.yaml\n"),
    (Load(State.STOPPING), "drain #shutdown\n"),
    (Load(State.STOPPED), "drain #shutdown\n"),
    (Load(State.STOPPING, draining="shutdown"), "drain #shutdown\n"),
    # restarting or failed: out of the pool until ready again
    (Load(State.STARTING), "maint #starting\n"),
    (Load(State.WARMING, total_slots=4), "maint #warming\n"),
    (Load(State.BACKOFF), "maint #backoff\n"),
    (Load(State.FAILED), "maint #failed\n"),
    # a drain during a restart (profile change) still says drain: the balancer keeps checking health
    (Load(State.STARTING, draining="profile change"), "drain #profile_change\n"),
    # several models: the default (or a pinned model) is not loaded, so the box is out, as /health says
    (Load(None), "maint #unloaded\n"),
    (Load(None, draining="shutdown"), "drain #shutdown\n"),
])
def test_reply(load: Load, expected: str) -> None:
    assert reply(load) == expected


@pytest.mark.parametrize(("total", "in_flight", "pct"), [
    (1, 0, 100), (1, 1, MIN_WEIGHT_PCT), (8, 1, 88), (8, 7, 12), (8, -1, 100), (0, 0, 100), (100, 99, 1),
])
def test_weight(total: int, in_flight: int, pct: int) -> None:
    assert weight_pct(total, in_flight) == pct


def test_every_reply_is_one_line_of_known_words() -> None:
    known = {"ready", "drain", "maint"}
    for state in [*State, None]:
        for draining in (None, "shut down, now\tplease"):
            line = reply(Load(state, draining=draining, total_slots=2, in_flight=1))
            assert line.endswith("\n") and line.count("\n") == 1 and "\r" not in line
            words = line.split("#")[0].split()
            assert words[0] in known
            assert all(w in known or (w.endswith("%") and w[:-1].isdigit()) for w in words)
            if "#" in line:
                assert len(line.split("#", 1)[1].split()) == 1  # the comment is one word


# ---- the listener and the drain sequence, with the real llama-server ---------------------------------


async def _ask(agent: AgentListener) -> str:
    assert agent.address is not None
    reader, writer = await asyncio.open_connection(*agent.address)
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return line.decode()


@pytest.mark.integration
async def test_listener_weight_follows_free_slots(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile(parallel=2, ctx_size=4096), agent_port=0) as d:
        assert d.agent is not None
        assert (await _ask(d.agent)).startswith("maint #")  # still loading
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert await _ask(d.agent) == "ready 100%\n"
        await wait_for(lambda: d.agent is not None and d.agent.load().total_slots == 2, what="/props asked")
        long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as c:
            one = asyncio.ensure_future(c.post(f"{d.url}/v1/chat/completions", json=long))
            await wait_for(lambda: d.default.in_flight == 1, what="one request in flight")
            assert await _ask(d.agent) == "ready 50%\n"
            two = asyncio.ensure_future(c.post(f"{d.url}/v1/chat/completions", json=long))
            await wait_for(lambda: d.default.in_flight == 2, what="two requests in flight")
            assert await _ask(d.agent) == f"ready {MIN_WEIGHT_PCT}%\n"
            assert [r.status_code for r in await asyncio.gather(one, two)] == [200, 200]


@pytest.mark.integration
async def test_shutdown_leaves_the_pool_before_it_stops_accepting(tmp_path: Path, write_profile) -> None:
    """SIGTERM's sequence: /health 503 and agent `drain` at once, requests still served during the notice,
    then the listener closes and the request in flight finishes."""
    async with running(tmp_path, write_profile(ctx_size=4096), agent_port=0, drain_notice_s=1.0,
                       drain_s=60) as d:
        assert d.agent is not None
        await wait_for(lambda: d.default.runner.ready, what="ready")
        async with httpx.AsyncClient(timeout=60) as c:
            long = asyncio.ensure_future(c.post(f"{d.url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "ignore_eos": True}))
            await wait_for(lambda: d.default.in_flight == 1, what="a request in flight")
            t0 = time.monotonic()
            d.request_stop()
            health = await c.get(f"{d.url}/health")
            assert health.status_code == 503
            assert health.json()["status"] == "draining" and health.json()["reason"] == "shutdown"
            assert health.json()["error"]["type"] == "unavailable_error"
            assert health.headers["retry-after"] == "5"
            assert await _ask(d.agent) == "drain #shutdown\n"
            # Still accepting during the notice: a balancer that has not looked yet loses nothing.
            late = await c.post(f"{d.url}/v1/chat/completions", json=CHAT)
            assert late.status_code == 200 and time.monotonic() - t0 < 1.0, late.text
            assert (await c.get(f"{d.url}/status")).json()["draining"] == "shutdown"
            await wait_for(lambda: d.server.should_exit, timeout=5, what="the listener closing")
            assert time.monotonic() - t0 >= 1.0
            assert (await long).status_code == 200  # drained, not cut


@pytest.mark.integration
async def test_profile_change_drains_before_the_restart(tmp_path: Path, write_profile) -> None:
    profile = write_profile(ctx_size=1024)
    async with running(tmp_path, profile, agent_port=0, drain_notice_s=0.5) as d:
        assert d.agent is not None
        await wait_for(lambda: d.default.runner.ready, what="ready")
        first = d.default.runner.machine.gen
        profile.write_text(profile.read_text().replace("ctx_size: 1024", "ctx_size: 2048"))
        reload = asyncio.ensure_future(d.reloader.reload("test"))
        await wait_for(lambda: d.drain.reason is not None, what="drain")
        assert d.default.runner.ready and d.default.runner.machine.gen == first  # the old child still serves ...
        assert await _ask(d.agent) == "drain #profile_change\n"  # ... but the balancer is told to go away
        async with httpx.AsyncClient(timeout=10) as c:
            assert (await c.get(f"{d.url}/health")).status_code == 503
        assert (await reload)["restarted"] == [d.pool.default]
        assert d.drain.reason is None and not d.default.runner.ready
        assert (await _ask(d.agent)).startswith("maint #")  # restarting: out until the new child is ready
        await wait_for(lambda: d.default.runner.ready and d.default.runner.machine.gen == first + 1, what="ready again")
        assert await _ask(d.agent) == "ready 100%\n"


def test_agent_is_off_by_default() -> None:
    assert Config().agent_port is None and Config().drain_notice_s == 0


@pytest.mark.integration
async def test_agent_with_several_models_follows_health(tmp_path: Path, write_profile) -> None:
    """With profiles_dir the agent says what /health says: ready while the default is, weighted by the free
    share of every serving model's slots; `maint #unloaded` once the default is unloaded; drain at shutdown."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("alpha", "beta"):
        write_profile(name, parallel=2, ctx_size=4096).rename(profiles / f"{name}.yaml")
    async with running(tmp_path, profiles / "alpha.yaml", profiles_dir=profiles, agent_port=0) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        assert d.agent is not None and d.pool is not None
        pool = d.pool
        await wait_for(lambda: pool.models["alpha"].seen().value == "loaded", what="alpha loaded")
        assert await _ask(d.agent) == "ready 100%\n"
        assert (await c.post("/admin/models/beta/load")).status_code == 202
        await wait_for(lambda: pool.models["beta"].seen().value == "loaded", what="beta loaded")
        long = {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500,
                "ignore_eos": True}
        one = asyncio.ensure_future(c.post("/v1/chat/completions", json=long))
        await wait_for(lambda: pool.in_flight() == 1, what="a request in flight on beta")
        assert await _ask(d.agent) == "ready 75%\n"  # 3 of the 4 slots (2 per model) are free
        assert (await one).status_code == 200

        assert (await c.post("/admin/models/alpha/unload")).status_code == 202
        await wait_for(lambda: pool.models["alpha"].seen().value == "unloaded", what="alpha unloaded")
        assert (await c.get("/health")).status_code == 503
        assert await _ask(d.agent) == "maint #unloaded\n"
        assert (await c.post("/admin/models/alpha/load")).status_code == 202
        await wait_for(lambda: pool.models["alpha"].seen().value == "loaded", what="alpha loaded again")
        assert await _ask(d.agent) == "ready 100%\n"
        d.request_stop()
        assert await _ask(d.agent) == "drain #shutdown\n"
