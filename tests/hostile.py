"""Support for the hostile-input suite: the real daemon as a process, the rules every answer must keep, raw HTTP,
and a local listener that must never see a request (llama-server fetching a URL a client sent)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

CLI = [sys.executable, "-m", "supervisor"]


@dataclass
class LiveDaemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    port: int = 0

    def __post_init__(self) -> None:
        self.port = int(self.url.rsplit(":", 1)[1])

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def status(self, key: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return dict(httpx.get(f"{self.url}/status", headers=headers, timeout=10).json())


def start_daemon(tmp: Path, llama_server: str, model: Path, mmproj: Path | None = None, *,
                 env: dict[str, str] | None = None, timeout_s: float = 60) -> LiveDaemon:
    """`llama-supervisor run` as a real process on a free port; its log goes to a file (checked for secrets)."""
    profile: dict[str, Any] = {"name": "hostile", "binary": llama_server, "model": str(model), "n_gpu_layers": 0,
                               "ctx_size": 4096, "cache_ram_mib": 0, "threads": 1, "parallel": 2}
    if mmproj is not None:
        profile["mmproj"] = str(mmproj)
    path = tmp / "hostile.yaml"
    path.write_text(yaml.safe_dump(profile))
    log = tmp / "daemon.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SUPERVISOR_")}
    full_env.update({"LLAMA_SUPERVISOR_STATE_DIR": str(tmp / "state"), "LLAMA_SUPERVISOR_CLIENT_TIMEOUT_S": "2",
                     **(env or {})})
    out = log.open("wb")
    proc = subprocess.Popen([*CLI, "run", "--profile", str(path), "--port", "0", "--log-format", "json"],
                            stderr=out, stdout=out, env=full_env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(r'"url": "(http://[^"]+)"', log.read_text(errors="replace"))
        if m:
            daemon = LiveDaemon(proc, m.group(1), log)
            wait_ready(daemon, deadline - time.monotonic(), (env or {}).get("LLAMA_SUPERVISOR_API_KEY"))
            return daemon
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("daemon did not start")


def wait_ready(d: LiveDaemon, timeout: float, key: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{d.url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("daemon never became ready")


def stop_daemon(d: LiveDaemon) -> None:
    if d.proc.poll() is None:
        d.proc.terminate()
        try:
            d.proc.wait(20)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(10)


def judged(status: int, body: bytes, what: str = "") -> None:
    """The rules: never a 500, and every 4xx/5xx body is one JSON error shape."""
    assert status != 500, f"{what}: 500: {body[:300]!r}"
    if status >= 400:
        try:
            err = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"{what}: {status} body is not a JSON error: {body[:300]!r}") from None
        assert isinstance(err.get("message"), str) and "type" in err and "code" in err, f"{what}: {body[:300]!r}"


def check(r: httpx.Response, what: str = "") -> httpx.Response:
    judged(r.status_code, r.content, what or f"{r.request.method} {r.request.url}")
    return r


def alive(d: LiveDaemon, key: str | None = None) -> None:
    """The daemon is up and still serves a real completion."""
    assert d.proc.poll() is None, "the daemon died"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{d.url}/v1/chat/completions", headers=headers, timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def raw(d: LiveDaemon, data: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """One raw HTTP exchange: (status, body). For what httpx would refuse to send (odd paths, huge headers)."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n\r\n")
            m = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            if sep and m and len(rest) >= int(m.group(1)):
                break
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP answer: {buf[:200]!r}"
    return int(head.split()[1]), body


@dataclass
class Listener:
    """A local TCP listener: any connection to it means someone fetched a URL a client sent."""
    sock: socket.socket
    port: int
    hits: list[bytes] = field(default_factory=list)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                try:
                    self.hits.append(conn.recv(4096))
                except OSError:
                    self.hits.append(b"?")
                conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")


def listener() -> Iterator[Listener]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    lis = Listener(sock, sock.getsockname()[1])
    threading.Thread(target=lis.serve, daemon=True).start()
    try:
        yield lis
    finally:
        sock.close()
