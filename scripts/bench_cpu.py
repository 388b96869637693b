"""What a request costs the proxy in CPU: the supervisor's own CPU time per request and per streamed token, with a
C proxy (HAProxy, or nginx) in front of the same llama-server in the same run as the reference.

Wall-clock differences on a shared machine are noisy; CPU time is what a user pays for (on a small box every
core-millisecond the proxy takes is taken from llama-server) and moves much less with the machine's load. The
figure is user + system time of all the process's threads, from /proc/PID/stat, read around each phase, less the
process's idle rate over the phase's length (its timers: the ops page's sampler, liveness), per request or per
token. HAProxy runs as one process (one thread here); for nginx it is the master and its worker.

The client is a lean raw-socket one, so the load generator leaves as much CPU as it can to the two sides.
Phases: an 8-token chat on a fresh connection per request and on one keep-alive connection; 16 concurrent
128-token streams; a 1024×768 JPEG chat request; a 10-turn conversation through the context guard.
Used by scripts/bench.py (`--only cpu` runs only this).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

CLK = os.sysconf("SC_CLK_TCK")
# The targets of issue 25 (aims printed beside the figures, not assertions).
TARGET_REQUEST_MS = 0.3
TARGET_TOKEN_US = 10.0
CHAT8 = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "ignore_eos": True}).encode()
STREAM_TOKENS = 128
STREAM = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": STREAM_TOKENS, "stream": True,
                     "ignore_eos": True}).encode()


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system time of every thread of these processes (/proc/PID/stat fields 14 and 15), in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # the command name may hold spaces
        total += int(fields[11]) + int(fields[12])
    return total / CLK


# ---- the reference: a C proxy ------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CProxy:
    """HAProxy (what deploy/ puts in front of a fleet; scripts/setup.sh installs it for the fleet tests) or nginx
    (`kind="nginx"`, if installed), as a plain reverse proxy: keep-alive connections to llama-server, responses
    not buffered."""

    def __init__(self, upstream: str, tmp: Path, kind: str = "haproxy") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        up = upstream.removeprefix("http://")
        d = tmp / f"cproxy-{self.port}"
        d.mkdir(parents=True, exist_ok=True)
        binary = shutil.which(kind) or (f"/usr/sbin/{kind}" if Path(f"/usr/sbin/{kind}").exists() else None)
        if binary is None:
            raise SystemExit(f"{kind} is not installed (scripts/setup.sh installs haproxy)")
        if kind == "nginx":
            self.name = "nginx"
            (d / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  client_max_body_size 64m;
  client_body_buffer_size 16m;
  upstream llama {{ server {up}; keepalive 4; keepalive_timeout 4s; }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://llama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering on;
      proxy_read_timeout 600s;
    }}
  }}
}}
""")
            argv = [binary, "-c", str(d / "nginx.conf"), "-p", str(d)]
        else:
            self.name = "haproxy"
            (d / "haproxy.cfg").write_text(f"""
global
  nbthread 1
defaults
  mode http
  retries 3
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  http-reuse always
  # Send each piece as it comes (streams): without it HAProxy lets the kernel hold small writes back (MSG_MORE),
  # which added ~90 ms to a stream's first token here.
  option http-no-delay
frontend f
  bind 127.0.0.1:{self.port}
  default_backend llama
backend llama
  # Like the supervisor (web/api/proxy.py KEEPALIVE_IDLE): few idle connections to llama-server, not for long,
  # so they do not pin its fixed HTTP threads.
  server s1 {up} pool-max-conn 4 pool-purge-delay 4s
""")
            argv = [binary, "-f", str(d / "haproxy.cfg"), "-db"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            try:
                httpx.get(f"{self.url}/health", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.02)
        raise SystemExit(f"{self.name} did not start")

    def pids(self) -> list[int]:
        return [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# ---- a lean client -----------------------------------------------------------------------------------


def request_bytes(base: str, body: bytes, keep_alive: bool) -> bytes:
    host = base.removeprefix("http://")
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
            + (b"" if keep_alive else b"Connection: close\r\n") + b"Content-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One whole response (Content-Length or chunked): (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:] if ln)}
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    return status, await reader.read()


def _addr(base: str) -> tuple[str, int]:
    host, _, port = base.removeprefix("http://").partition(":")
    return host, int(port)


async def fresh(base: str, body: bytes, n: int) -> None:
    """`n` requests one after another, each on a new connection."""
    host, port = _addr(base)
    raw = request_bytes(base, body, keep_alive=False)
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw)
        status, data = await read_response(reader)
        writer.close()
        if status != 200:
            raise SystemExit(f"{base}: {status} {data[:300]!r}")


async def keep_alive(base: str, body: bytes, n: int) -> None:
    """`n` requests one after another on one connection."""
    host, port = _addr(base)
    raw = request_bytes(base, body, keep_alive=True)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(n):
            writer.write(raw)
            status, data = await read_response(reader)
            if status != 200:
                raise SystemExit(f"{base}: {status} {data[:300]!r}")
    finally:
        writer.close()


async def one_stream(base: str, body: bytes) -> int:
    """One streamed request on its own connection; the SSE events it got (llama-server sends one per generated
    token, less the few whose text is an incomplete UTF-8 sequence, plus the final ones)."""
    host, port = _addr(base)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request_bytes(base, body, keep_alive=False))
    events, tail, last = 0, b"", b""
    while chunk := await reader.read(65536):
        buf = tail + chunk
        events += buf.count(b"data: ") - tail.count(b"data: ")
        tail = buf[-8:]
        last = (last + chunk)[-4096:]
    writer.close()
    if b'"finish_reason":"length"' not in last:
        raise SystemExit(f"{base}: a stream ended before its {STREAM_TOKENS} tokens: {last[-300:]!r}")
    return events


async def streams(base: str, body: bytes, clients: int, rounds: int) -> tuple[int, int]:
    """`rounds` of `clients` streams at once: (tokens generated, SSE events relayed)."""
    events = 0
    for _ in range(rounds):
        events += sum(await asyncio.gather(*(one_stream(base, body) for _ in range(clients))))
    return clients * rounds * STREAM_TOKENS, events


# ---- phases ------------------------------------------------------------------------------------------


async def idle_rate(pids: Sequence[int], seconds: float = 3.0) -> float:
    """CPU seconds per second with no requests: subtracted from each phase (its timers are not the requests')."""
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pids) - c0) / (time.perf_counter() - t0)


async def measure(pids: Sequence[int], idle: float, run: Any) -> tuple[float, Any]:
    """(CPU seconds the phase took beyond idle, what `run` returned)."""
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    got = await run
    spent = cpu_seconds(pids) - c0 - idle * (time.perf_counter() - t0)
    return max(spent, 0.0), got


def put(out: dict[str, Any], key: str, spent: float, count: int, scale: float) -> None:
    """`key`: CPU per unit (seconds × scale); `key_resolution`: one clock tick per unit, the smallest step."""
    out[key] = round(spent / count * scale, 4)
    out[f"{key}_resolution"] = round(1 / CLK / count * scale, 4)




async def text_phases(sides: dict[str, tuple[str, list[int]]], n: int, rounds: int) -> dict[str, Any]:
    """Chat (fresh connection, keep-alive) and 16 streams, for each side {name: (url, pids)}; sides alternate
    phase by phase."""
    out: dict[str, Any] = {name: {} for name in sides}
    idle = {name: await idle_rate(pids) for name, (_, pids) in sides.items()}
    for url, _ in sides.values():  # warm: connections, caches, the first-request paths
        await fresh(url, CHAT8, 20)
        await streams(url, STREAM, 16, 1)
    for name, (url, pids) in sides.items():
        out[name]["idle_cpu_percent"] = round(idle[name] * 100, 3)
        spent, _ = await measure(pids, idle[name], fresh(url, CHAT8, n))
        put(out[name], "chat_fresh_ms", spent, n, 1e3)
    for name, (url, pids) in sides.items():
        spent, _ = await measure(pids, idle[name], keep_alive(url, CHAT8, n))
        put(out[name], "chat_keepalive_ms", spent, n, 1e3)
    for name, (url, pids) in sides.items():
        spent, (tokens, events) = await measure(pids, idle[name], streams(url, STREAM, 16, rounds))
        requests = 16 * rounds
        put(out[name], "stream_token_us", spent, tokens, 1e6)
        # The same less each stream's request cost (as measured for a fresh-connection chat): what each token adds.
        per_request = out[name]["chat_fresh_ms"] / 1000
        put(out[name], "stream_token_marginal_us", max(spent - requests * per_request, 0), tokens, 1e6)
        out[name]["stream_tokens"], out[name]["stream_events"] = tokens, events
    out["n"], out["stream_rounds"] = n, rounds
    return out


def image_body() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1024, 768), (90, 140, 200))
    d = ImageDraw.Draw(img)
    for i in range(0, 1024, 16):
        d.line((i, 0, 1024 - i, 768), fill=(i % 255, 80, 160), width=2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                                                 {"type": "image_url", "image_url": {"url": url}}]}],
                       "max_tokens": 1}).encode()


def guard_body() -> bytes:
    import bench_context

    return json.dumps({"messages": bench_context.conversation(40), "max_tokens": 8, "ignore_eos": True}).encode()


async def vision_phases(sides: dict[str, tuple[str, list[int]]], n: int) -> dict[str, Any]:
    """An image request and a request through the context guard (on by default with a projector), per side."""
    out: dict[str, Any] = {name: {} for name in sides}
    img, conv = image_body(), guard_body()
    idle = {name: await idle_rate(pids) for name, (_, pids) in sides.items()}
    for url, _ in sides.values():
        await keep_alive(url, img, 3)
        await keep_alive(url, conv, 10)
    images = max(10, n // 5)
    for name, (url, pids) in sides.items():
        spent, _ = await measure(pids, idle[name], keep_alive(url, img, images))
        put(out[name], "image_ms", spent, images, 1e3)
    for name, (url, pids) in sides.items():
        spent, _ = await measure(pids, idle[name], keep_alive(url, conv, n))
        put(out[name], "guard_ms", spent, n, 1e3)
    out["image_bytes"], out["guard_body_bytes"], out["n"] = len(img), len(conv), n
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, supervisor, C proxy, target) rows for scripts/bench.py."""
    text, vision = r.get("text") or {}, r.get("vision") or {}
    ref = r.get("reference", "C proxy")
    sup, cp = text.get("supervisor", {}), text.get(ref, {})
    vsup, vcp = vision.get("supervisor", {}), vision.get(ref, {})

    def shown(d: dict[str, Any], k: str, unit: str) -> str:
        if k not in d:
            return "—"
        step = d.get(f"{k}_resolution", 0)
        return f"< {step:.3g} {unit}" if d[k] < step else f"{d[k]:.3g} {unit}"

    def ms(d: dict[str, Any], k: str) -> str:
        return shown(d, k, "ms")

    def us(d: dict[str, Any], k: str) -> str:
        return shown(d, k, "µs")

    out = [
        ("CPU per request: chat, 8 tokens, fresh connection", ms(sup, "chat_fresh_ms"), ms(cp, "chat_fresh_ms"),
         f"≤ {TARGET_REQUEST_MS} ms"),
        ("CPU per request: chat, 8 tokens, keep-alive", ms(sup, "chat_keepalive_ms"), ms(cp, "chat_keepalive_ms"),
         f"≤ {TARGET_REQUEST_MS} ms"),
        ("CPU per streamed token: 16 streams × 128 tokens, all of it", us(sup, "stream_token_us"),
         us(cp, "stream_token_us"), f"≤ {TARGET_TOKEN_US:g} µs"),
        ("CPU per streamed token, less each stream's request cost", us(sup, "stream_token_marginal_us"),
         us(cp, "stream_token_marginal_us"), ""),
    ]
    if vision:
        out += [
            ("CPU per request: 1024×768 JPEG chat (media policy)", ms(vsup, "image_ms"), ms(vcp, "image_ms"), ""),
            ("CPU per request: 10-turn chat through the context guard", ms(vsup, "guard_ms"), ms(vcp, "guard_ms"),
             f"≤ {TARGET_REQUEST_MS} ms"),
        ]
    return out
