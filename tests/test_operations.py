"""Operations: systemd notify, hot reload, metrics, API keys, settings."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from support import metric, running, wait_for

from supervisor.host.sdnotify import Notifier
from supervisor.spec.settings import ConfigError, load_config

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True}


class NotifySocket:
    """A test-owned datagram socket standing in for systemd's notify socket."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages


async def test_sd_notify_ready_only_after_warmup(tmp_path: Path, write_profile) -> None:
    ns = NotifySocket(tmp_path)
    notifier = Notifier({"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "300000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_s == 0.3
    async with running(tmp_path, write_profile(), notifier=notifier) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        await wait_for(lambda: sum(m == "WATCHDOG=1" for m in ns.drain()) >= 2, what="two watchdog pings")
        msgs = ns.drain()
        ready_at = next(i for i, m in enumerate(msgs) if m.startswith("READY=1"))
        assert any(m.startswith("STATUS=warming") for m in msgs[:ready_at]), msgs
        assert any(m.startswith("STATUS=loading model") for m in msgs[:ready_at]), msgs
        assert not any("EXTEND_TIMEOUT_USEC" in m for m in msgs[ready_at:]), msgs  # see test_systemd.py
        assert "STATUS=ready" in msgs[ready_at]
    msgs = ns.drain()
    assert "STOPPING=1" in msgs and any(m.startswith("STATUS=stopped") for m in msgs)


def test_notifier_abstract_socket_and_foreign_watchdog_pid() -> None:
    n = Notifier({"NOTIFY_SOCKET": "@llama-test", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.address == "\0llama-test" and n.watchdog_s is None
    assert not Notifier({}).send("READY=1")


async def test_reload_bad_edit_keeps_serving_good_edit_restarts(tmp_path: Path, write_profile) -> None:
    profile = write_profile(name="live")
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid = d.default.runner.child.pid
        data = yaml.safe_load(profile.read_text())

        # A broken edit: the child keeps serving, /status says what is wrong.
        profile.write_text(yaml.safe_dump({**data, "ctx_size": -1}))
        await wait_for(lambda: d.reloader.last_error is not None, what="reload error")
        st = (await c.get("/status")).json()
        assert st["last_reload_error"]["file"] == str(profile)
        assert st["last_reload_error"]["errors"][0]["field"] == "ctx_size"
        assert st["state"] == "ready" and st["child"]["pid"] == pid
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200

        # An edit that does not touch the child (image policy): no restart, the error clears.
        profile.write_text(yaml.safe_dump({**data, "images": {"keep_last_images": 1}}))
        await wait_for(lambda: d.reloader.last_error is None, what="error cleared")
        assert d.default.runner.child.pid == pid and d.default.runner.loaded.profile.images.keep_last_images == 1

        # An atomic save (temp file renamed over) that changes the argv: one drain-and-restart.
        tmp = profile.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({**data, "ctx_size": 2048}))
        os.replace(tmp, profile)
        await wait_for(lambda: d.default.runner.ready and d.default.runner.child.pid != pid, what="restart with new profile")
        assert "2048" in d.default.runner.argv
        assert d.default.runner.machine.restarts == 1


async def test_switching_the_active_profile_in_the_settings_file(tmp_path: Path, write_profile,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_profile(name="first")
    elsewhere = tmp_path / "profiles"
    elsewhere.mkdir()
    second = elsewhere / "second.yaml"
    write_profile(name="second", ctx_size=2048).rename(second)
    settings = tmp_path / "supervisor.yaml"
    settings.write_text(f"profile: {first}\n")
    monkeypatch.setenv("LLAMA_SUPERVISOR_CONFIG", str(settings))
    async with running(tmp_path, first, settings_file=settings) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert d.default.runner.loaded.profile.name == "first"
        settings.write_text(f"profile: {second}\n")
        await wait_for(lambda: d.default.runner.ready and d.default.runner.loaded.profile.name == "second", what="switched")
        assert "2048" in d.default.runner.argv
        # The watch followed the active profile into its folder: an edit there is picked up too.
        second.write_text(second.read_text().replace("ctx_size: 2048", "ctx_size: 3072"))
        await wait_for(lambda: d.default.runner.ready and "3072" in d.default.runner.argv, what="edit in the new folder")


async def test_burst_of_saves_gives_one_restart(tmp_path: Path, write_profile) -> None:
    profile = write_profile(name="burst")
    async with running(tmp_path, profile) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        data = yaml.safe_load(profile.read_text())
        for ctx in (1100, 1200, 1300, 1400, 1500):
            profile.write_text(yaml.safe_dump({**data, "ctx_size": ctx}))
            await asyncio.sleep(0.02)
        await wait_for(lambda: d.default.runner.ready and "1500" in d.default.runner.argv, what="restart")
        await asyncio.sleep(1.0)
        assert d.default.runner.machine.restarts == 1


async def test_reload_via_api_and_sighup_path(tmp_path: Path, write_profile) -> None:
    profile = write_profile(name="api")
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.post("/admin/reload")
        assert r.json()["ok"] is True and r.json()["restarted"] == [] and r.json()["updated"] == []
        data = yaml.safe_load(profile.read_text())
        profile.write_text(yaml.safe_dump({**data, "extra_args": ["--mlock"]}))
        r = await c.post("/admin/reload")
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["errors"][0]["field"] == "extra_args" and "--load-mode" in err["errors"][0]["message"]


async def test_metrics_after_traffic_and_restart(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        for _ in range(3):
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        body = {**CHAT, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_bytes():
                pass
        os.kill(d.default.runner.child.pid, signal.SIGKILL)
        await wait_for(lambda: d.default.runner.machine.restarts == 1 and d.default.runner.ready, what="restart")
        text = (await c.get("/metrics")).text

        def value(name: str, **labels: str) -> float:
            assert re.search(rf'^llama_supervisor_{name}\{{[^}}]*model="test"', text, re.M), f"{name} missing"
            return metric(text, name, model="test", **labels)

        assert value("state", state="ready") == 1
        assert value("child_up") == 1
        assert value("restarts_total", cause="crashed") == 1
        assert value("requests_total", route="/v1/chat/completions", status="200") == 4
        assert value("request_seconds_count", route="/v1/chat/completions") == 4
        assert value("tokens_total", kind="completion") == 16
        assert value("tokens_total", kind="prompt") > 0
        assert value("load_seconds") > 0
        assert value("warmup_seconds") > 0
        assert value("effective_gpu_layers") == 0
        assert value("child_rss_bytes") > 1e6
        assert value("in_flight") == 0
        assert "llama_supervisor_gpu_memory_used_bytes" not in text  # no GPU here: series absent, no error


async def test_api_and_admin_keys(tmp_path: Path, write_profile) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text("admin-secret\n")
    async with running(tmp_path, write_profile(), api_key="api-secret", admin_key_file=key_file) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert (await c.get("/health")).status_code == 200  # never needs a key
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer api-secret"})
        assert r.status_code == 200
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "api-secret"})
        assert r.status_code == 200
        assert (await c.get("/status", headers={"x-api-key": "api-secret"})).status_code == 401
        r = await c.get("/status", headers={"Authorization": "Bearer admin-secret"})
        assert r.status_code == 200
        assert "admin-secret" not in r.text and "api-secret" not in r.text
        assert (await c.get("/metrics")).status_code == 401


def test_settings_precedence_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "supervisor.yaml"
    f.write_text("port: 9000\nhost: 0.0.0.0\nprofile: p.yaml\nqueue_max: 7\n")
    monkeypatch.setenv("LLAMA_SUPERVISOR_CONFIG", str(f))
    monkeypatch.setenv("LLAMA_SUPERVISOR_PORT", "9100")
    cfg = load_config(host="127.0.0.2")
    assert (cfg.host, cfg.port, cfg.queue_max) == ("127.0.0.2", 9100, 7)
    assert cfg.resolved_profile() == tmp_path / "p.yaml"
    f.write_text("port: 9000\nqueue_max: -1\nbogus: 1\n")
    monkeypatch.delenv("LLAMA_SUPERVISOR_PORT")
    with pytest.raises(ConfigError) as exc:
        load_config()
    text = str(exc.value)
    assert "queue_max" in text and "bogus: unknown setting" in text and str(f) in text
    monkeypatch.setenv("LLAMA_SUPERVISOR_PORT", "eighty")
    with pytest.raises(ConfigError, match="environment LLAMA_SUPERVISOR_PORT"):
        load_config()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze missing: scripts/setup.sh installs Debian's systemd package in CI")
    unit = Path(__file__).resolve().parent.parent / "systemd" / "llama-supervisor.service"
    # Point ExecStart at something that exists here; verify everything else as written.
    text = unit.read_text().replace("/opt/llama-supervisor/.venv/bin/llama-supervisor", shutil.which("true") or "/bin/true")
    copy = tmp_path / "llama-supervisor.service"
    copy.write_text(text)
    cp = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    problems = [ln for ln in cp.stderr.splitlines() if "llama-supervisor.service" in ln]
    assert cp.returncode == 0 and not problems, cp.stderr
