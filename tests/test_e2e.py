"""End to end through the supervisor, with the real llama-server and the tiny model."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import psutil
import pytest
import structlog
from support import running, wait_for


async def test_health_goes_503_then_200_and_chat_works(tmp_path: Path, write_profile) -> None:
    profile = write_profile()
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        seen = set()
        for _ in range(400):
            r = await c.get("/health")
            seen.add(r.status_code)
            if r.status_code == 200:
                break
            assert r.json()["status"] in ("starting", "warming")
            await asyncio.sleep(0.005)
        assert seen == {503, 200}, seen
        assert r.json()["status"] == "ok"
        r = await c.post("/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 8


async def test_streaming_passes_chunks_through(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "stream": True, "ignore_eos": True}
        events = []
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["timings"]["predicted_n"] == 32
        # Tokens arrive as separate events (a byte token that ends mid UTF-8 character may add no text).
        assert sum(1 for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")) >= 8


async def test_client_disconnect_stops_generation(tmp_path: Path, write_profile) -> None:
    """Leaving mid-stream must close the upstream request: llama-server's slot goes idle long before
    the 100k tokens asked for could be generated."""
    async with running(tmp_path, write_profile(parallel=1)) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000, "stream": True,
                "ignore_eos": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if n > 20:
                    break
        async def idle() -> bool:
            s = (await c.get("/slots")).json()
            return not s[0]["is_processing"]

        for _ in range(100):
            if await idle():
                break
            await asyncio.sleep(0.05)
        # At a few thousand tokens/s, 100k tokens take far longer than the 5 s waited here.
        s = (await c.get("/slots")).json()[0]
        assert not s["is_processing"], s


async def test_a_client_that_leaves_a_whole_answer_is_a_499_and_nothing_else(tmp_path: Path, write_profile) -> None:
    """A non-streamed request whose client gives up: llama-server stops generating, the request counts as 499,
    nothing is logged as an error (it is not a supervisor error, nor a shutdown), and the next request is served."""
    async with running(tmp_path, write_profile(parallel=1)) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000, "ignore_eos": True}
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/chat/completions", json=body, timeout=0.5)

            async def idle() -> bool:
                return not (await c.get("/slots")).json()[0]["is_processing"]

            for _ in range(100):
                if await idle():
                    break
                await asyncio.sleep(0.05)
            assert await idle()  # 100k tokens would take far longer than the 5 s waited here
            r = await c.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert r.status_code == 200
        assert not [e for e in logs if e["log_level"] in ("error", "warning")], logs
        metrics = (await c.get("/metrics")).text
        assert re.search(r'^llama_supervisor_requests_total\{[^}]*route="/v1/chat/completions",status="499"\} 1\.0$',
                         metrics, re.M), metrics


async def test_status_fields_are_true(tmp_path: Path, write_profile) -> None:
    profile = write_profile(name="stat")
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        st = (await c.get("/status")).json()
        assert st["state"] == "ready"
        assert st["profile"] == {"name": "stat", "file": str(profile)}
        pid = st["child"]["pid"]
        proc = psutil.Process(pid)
        assert proc.is_running() and proc.name() == "llama-server"
        assert proc.cmdline() == st["argv"]
        assert st["child"]["rss_bytes"] > 0
        assert st["restarts"] == 0 and st["last_exit"] is None
        assert st["load_s"] > 0 and st["warmup_s"] > 0
        assert st["llama_server_version"].startswith(d.default.runner.loaded.caps.version.split()[0])
        assert any("load_model" in line or "model" in line for line in st["log_tail"])
        assert [t["to"] for t in st["transitions"]] == ["starting", "warming", "ready"]
        assert st["supervisor"]["uptime_s"] > 0
        assert "--ctx-size" in st["argv"] and st["argv"][st["argv"].index("--ctx-size") + 1] == "1024"


async def test_proxy_passes_other_routes_and_forwarded_for(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.post("/tokenize", json={"content": "hello"})
        assert r.status_code == 200 and r.json()["tokens"]
        props = (await c.get("/props")).json()
        assert props["default_generation_settings"]["n_ctx"] * 2 == 1024  # two slots share the context
        r = await c.get("/v1/models")
        assert r.json()["data"][0]["id"] == "test"
        r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json=[1, 2])
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


async def test_child_metrics_are_exposed(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.get("/child/metrics")
        assert r.status_code == 200 and "llamacpp:" in r.text


async def test_wrong_method_on_own_route_is_json(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        r = await c.post("/health")
        assert r.status_code == 405 and "POST /health" in r.json()["error"]["message"]
        r = await c.get("/admin/restart")
        assert r.status_code == 405 and r.json()["error"]["code"] == 405
        assert (await c.head("/health")).status_code in (200, 503)


async def test_image_to_a_text_only_profile_is_a_400(tmp_path: Path, write_profile) -> None:
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    async with running(tmp_path, write_profile(name="textonly")) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [img]}]})
        assert r.status_code == 400 and "no vision projector" in r.json()["error"]["message"]
        r = await c.post("/predict", json={"prompt": "x", "images": ["iVBORw0KGgo="]})
        assert r.status_code == 400 and "textonly" in r.json()["error"]["message"]
        r = await c.post("/predict", json={"prompt": "say hi", "max_tokens": 2})
        assert r.status_code == 200 and "response" in r.json()


async def test_a_conversation_over_the_context_is_a_400_and_the_child_keeps_serving(tmp_path: Path,
                                                                                   write_profile) -> None:
    async with running(tmp_path, write_profile(name="small", ctx_size=512)) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid = d.default.runner.child.pid
        long = {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 4}
        for body in (long, {**long, "stream": True}):
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "exceed_context_size_error" and err["n_ctx"] == 256  # per slot
            # llama-server's own words, then what the operator can change in which profile.
            assert "exceeds the available context size" in err["message"]
            assert "Profile 'small' runs with ctx_size 512 shared by 2 parallel slots; the proxy keeps the last 3 images" in err["message"]
            assert err["message"].endswith("or set images.keep_last_turns in the profile")  # not set in this profile
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200
        assert d.default.runner.ready and d.default.runner.child.pid == pid and d.default.runner.machine.restarts == 0
