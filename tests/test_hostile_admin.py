"""Fail closed: admin routes with only an API key configured, keys from the environment kept out of the child,
/status and the logs; listening beyond loopback without a key is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
from hostile import CLI, alive, check, start_daemon, stop_daemon

from supervisor.spec.settings import ConfigError, is_loopback, load_config

pytestmark = pytest.mark.timeout(300)
API_KEY = "api-secret-4f1c9e"


def test_admin_routes_need_the_api_key_when_no_admin_key(tmp_path: Path, llama_server: str, tiny_model: Path) -> None:
    d = start_daemon(tmp_path, llama_server, tiny_model, env={"LLAMA_SUPERVISOR_API_KEY": API_KEY,
                                                               "LLAMA_SUPERVISOR_LOG_CHILD_OUTPUT": "true"})
    try:
        with httpx.Client(base_url=d.url, timeout=30) as c:
            assert c.get("/health").status_code == 200  # open for load balancers
            for method, path in (("GET", "/status"), ("GET", "/metrics"), ("GET", "/child/metrics"),
                                 ("POST", "/admin/reload"), ("POST", "/admin/restart?reset=1"),
                                 ("GET", "/%73tatus"), ("POST", "/admin%2Frestart"), ("GET", "/v1/models")):
                r = check(c.request(method, path))
                assert r.status_code == 401, (path, r.status_code)
                r = check(c.request(method, path, headers={"Authorization": "Bearer wrong"}))
                assert r.status_code == 401, path
            auth = {"Authorization": f"Bearer {API_KEY}"}
            st = check(c.get("/status", headers=auth)).json()
            assert st["state"] == "ready"
            assert check(c.get("/metrics", headers={"x-api-key": API_KEY})).status_code == 200
            child_pid = st["child"]["pid"]
        env = Path(f"/proc/{child_pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in env if e.startswith(b"LLAMA_SUPERVISOR_")], "supervisor settings leaked to the child"
        assert not any(API_KEY.encode() in e for e in env)
        assert API_KEY not in str(st), "the key shows in /status"
        alive(d, API_KEY)
    finally:
        stop_daemon(d)
    assert API_KEY not in d.log.read_text(errors="replace"), "the key shows in the logs"


def test_network_listen_without_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [k for k in os.environ if k.startswith("LLAMA_SUPERVISOR_")]:
        monkeypatch.delenv(var)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.5")
    with pytest.raises(ConfigError, match="allow_network_without_key"):
        load_config(host="0.0.0.0")
    assert load_config(host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert load_config(host="0.0.0.0", allow_network_without_key=True).host == "0.0.0.0"
    profile = tmp_path / "p.yaml"
    profile.write_text("model: /nonexistent.gguf\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SUPERVISOR_")}
    cp = subprocess.run([*CLI, "run", "--profile", str(profile), "--host", "0.0.0.0", "--port", "0"],
                        check=False, capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode != 0 and "allow_network_without_key" in cp.stderr
