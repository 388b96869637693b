"""One program: a single profile (`--profile FILE`) and a profiles_dir holding that same profile are the same pool
of one model, with the same /status, /health, /v1/models, metric names and labels, and agent answers."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
from support import running, wait_for

from supervisor.daemon import Daemon

CHAT = {"model": "whatever-the-client-was-configured-with", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4}


def _key_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two documents' keys differ, all the way down (lists by their first item): what a client or a
    dashboard depends on. Values may differ (timings, pids, a figure not measured yet)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}" for k in sorted(a.keys() ^ b.keys())]
        for k in a.keys() & b.keys():
            out += _key_differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and a and b:
        return _key_differences(a[0], b[0], f"{path}[0]")
    return []


def _series(text: str) -> set[str]:
    """Every llama_supervisor_* family a scrape declares (`# TYPE` lines: declared whether or not an event has
    given it a sample yet, so the comparison does not depend on timing)."""
    return {line for line in text.splitlines() if line.startswith("# TYPE llama_supervisor_")}


def _labels(text: str, name: str) -> set[tuple[str, ...]]:
    """The label names of one family's samples."""
    out = set()
    for line in text.splitlines():
        m = re.match(rf"llama_supervisor_{name}(?:\{{([^}}]*)\}})? ", line)
        if m:
            out.add(tuple(sorted(p.split("=")[0] for p in (m.group(1) or "").split(",") if p)))
    return out


async def _agent(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = await reader.readline()
    writer.close()
    return line.decode()


async def _observe(d: Daemon) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        chat = await c.post("/v1/chat/completions", json=CHAT)  # any model name goes to the one model
        assert chat.status_code == 200, chat.text
        status = (await c.get("/status")).json()
        health = (await c.get("/health")).json()
        models = (await c.get("/v1/models")).json()
        metrics = (await c.get("/metrics")).text
        overview = (await c.get("/ui/api/overview")).json()
    assert d.agent is not None and d.agent.address is not None
    agent = await _agent(d.agent.address[1])
    return {"status": status, "health": health, "models": models, "metrics": metrics, "overview": overview,
            "agent": agent}


async def test_a_single_profile_and_a_folder_of_it_are_the_same_program(tmp_path: Path, write_profile) -> None:
    profile = write_profile(name="solo")
    folder = tmp_path / "profiles"
    folder.mkdir()
    shutil.copy(profile, folder / "solo.yaml")
    seen = []
    for i, extra in enumerate([{}, {"profiles_dir": folder}]):
        path = profile if not extra else folder / "solo.yaml"
        async with running(tmp_path / f"run{i}", path, agent_port=0, **extra) as d:
            seen.append(await _observe(d))
    one, many = seen
    assert _key_differences(one["status"], many["status"]) == []
    assert one["status"]["default_model"] == "solo" and list(one["status"]["models"]) == ["solo"]
    assert one["health"] == many["health"] == {"status": "ok", "models": {"solo": "ready"}}
    assert _key_differences(one["models"], many["models"]) == []
    assert [m["id"] for m in one["models"]["data"]] == ["solo"] and one["models"]["data"][0]["state"] == "loaded"
    assert _series(one["metrics"]) == _series(many["metrics"])
    for text in (one["metrics"], many["metrics"]):
        assert _labels(text, "requests_total") == {("model", "route", "status")}
        assert _labels(text, "child_rss_bytes") == {("model",)}
        assert _labels(text, "state") == {("model", "state")}
    assert one["agent"] == many["agent"] and one["agent"].startswith("ready ")
    assert _key_differences(one["overview"], many["overview"]) == []
    assert [m["profile"]["name"] for m in one["overview"]["models"]] == ["solo"]


async def test_a_swap_keeps_what_the_model_learned(tmp_path: Path, write_profile) -> None:
    """The model owns one runner and one proxy for its whole life: an unload and a load keep the quarantine,
    the generations and the proxy's connections pool, instead of starting from nothing."""
    profile = write_profile(name="kept")
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        runner, proxy = d.default.runner, d.proxy_of()
        gen = runner.machine.gen
        assert (await c.post("/admin/models/kept/unload")).status_code == 202
        await wait_for(lambda: not d.default.resident, what="unloaded")
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unloaded"
        # A request loads it again: the same runner and proxy, the next generation.
        chat = await c.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 200, chat.text
        assert d.default.runner is runner and d.proxy_of() is proxy and runner.machine.gen == gen + 1
        st = (await c.get("/status")).json()
        assert st["models"]["kept"]["loads"] == 2 and st["models"]["kept"]["last_unload"]["reason"] == "admin"


async def test_only_api_key_guards_the_page_like_the_admin_routes(tmp_path: Path, write_profile) -> None:
    """With only api_key set, the admin side takes the API key, and the page is told a key is needed."""
    profile = write_profile(name="keyed")
    async with running(tmp_path, profile, api_key="k") as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        auth = (await c.get("/ui/api/auth")).json()
        assert auth == {"required": True, "valid": False}
        auth = (await c.get("/ui/api/auth", headers={"Authorization": "Bearer k"})).json()
        assert auth == {"required": True, "valid": True}
        assert (await c.get("/status")).status_code == 401
        assert (await c.get("/status", headers={"x-api-key": "k"})).status_code == 200
