"""Every error the supervisor itself makes is OpenAI's shape: {"error": {"message", "type", "code"}}.

The app runs in-process (ASGI) around a runner that was never started: the errors a stopped child, a
missing key, a bad body or a bad reload produce need no running llama-server, only the real binary's probe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import make_config

from supervisor.daemon import Daemon
from supervisor.web.app import App

ADMIN = {"Authorization": "Bearer admin-secret"}
API = {"Authorization": "Bearer api-secret"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"].endswith("_error"), err
    assert err["code"] == status, err
    return err


@pytest.fixture
async def app(tmp_path: Path, write_profile) -> AsyncIterator[App]:
    """The daemon's app, wired as in production, with no model loaded (its pool never started)."""
    profile = write_profile()
    cfg = make_config(tmp_path, api_key="api-secret", admin_key="admin-secret", queue_wait_s=0.0,
                      max_body_bytes=1000)
    daemon = Daemon(cfg, profile)
    await daemon.prepare()
    yield daemon.app
    await daemon.pool.stop()


def client(app: App, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://supervisor", headers=headers)


async def test_auth_errors(app: App) -> None:
    async with client(app) as c:
        err = openai_error(await c.post("/v1/chat/completions", json=CHAT), 401)
        assert err["type"] == "authentication_error" and "Authorization: Bearer" in err["message"]
        openai_error(await c.get("/status", headers=API), 401)  # the API key is not the admin key
        openai_error(await c.post("/admin/reload"), 401)


async def test_own_route_errors(app: App) -> None:
    async with client(app, ADMIN) as c:
        err = openai_error(await c.post("/health"), 405)
        assert "POST /health" in err["message"]
        openai_error(await c.get("/admin/restart"), 405)
        err = openai_error(await c.get("/child/metrics"), 503)
        assert "not running" in err["message"]
        r = await c.get("/health")  # not loaded: 503 with the status fields load balancers and people read
        openai_error(r, 503)
        assert r.json()["status"] == "unloaded" and r.headers["retry-after"] == "5"


async def test_rejected_reload_keeps_its_fields(app: App) -> None:
    path = app.own.reloader.default_path
    path.write_text("name: broken\nmodel: /nonexistent.gguf\n")
    async with client(app, ADMIN) as c:
        r = await c.post("/admin/reload")
    err = openai_error(r, 422)
    assert r.json()["ok"] is False and r.json()["restarted"] == []
    assert err["file"] == str(path) and err["errors"][0]["field"] == "model"
    assert "/nonexistent.gguf" in err["message"]


async def test_proxy_errors(app: App) -> None:
    async with client(app, API) as c:
        err = openai_error(await c.post("/v1/chat/completions", content=b"{not json"), 400)
        assert "not valid JSON" in err["message"]
        openai_error(await c.post("/v1/chat/completions", content=b"x" * 1001), 413)
        r = await c.post("/v1/chat/completions", json=CHAT)  # the child is stopped: no wait, a 503
        err = openai_error(r, 503)
        assert err["type"] == "unavailable_error" and r.headers["retry-after"] == "5"


async def test_official_client_reads_the_message(app: App) -> None:
    async with client(app) as http:
        oai = openai.AsyncOpenAI(api_key="wrong", base_url="http://supervisor/v1", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "API key required" in info.value.message
