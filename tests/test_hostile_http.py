"""Hostile HTTP against the real daemon: odd paths, oversized headers, bodies over the limit, stalled clients."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hostile import LiveDaemon, alive, judged, raw, start_daemon, stop_daemon

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, llama_server: str, tiny_model: Path) -> Iterator[LiveDaemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("hostile-http"), llama_server, tiny_model,
                          env={"LLAMA_SUPERVISOR_MAX_BODY_BYTES": str(1024 * 1024)})
    yield daemon
    stop_daemon(daemon)


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n" + extra + b"connection: close\r\n\r\n"


def test_odd_paths_never_500(d: LiveDaemon) -> None:
    paths = [b"/v1/models%20x", b"/v1/caf%C3%A9", b"/v1/caf\xc3\xa9", b"/v1/models%23x", b"/v1%2Fmodels",
             b"/v1/chat%2Fcompletions", b"//v1/models", b"/v1/./models", b"/v1/../v1/models", b"/%00", b"/%",
             b"/%zz", b"/" + b"a" * 20000, b"/v1/models?x=%23&y=\xc3\xa9", b"/v1/models?" + b"q" * 5000,
             b"/slots/99999999999", b"/slots/-1", b"/cors-proxy?url=http://127.0.0.1/", b"*", b"http://evil/v1/models",
             b"/status/../admin/restart", b"/health%00"]
    for path in paths:
        status, body = raw(d, get(path))
        judged(status, body, repr(path[:60]))
    # known routes still answer, with the query passed through
    status, body = raw(d, get(b"/v1/models?x=%23&y=%C3%A9"))
    assert status == 200, body
    status, body = raw(d, get(b"/v1/models%20x"))
    assert status == 404 and b"not a route the supervisor forwards" in body
    status, body = raw(d, get(b"/cors-proxy"))
    assert status == 403
    status, body = raw(d, b"POST /v1/models HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    assert status == 405
    for method in (b"PUT", b"DELETE", b"PATCH", b"TRACE", b"FOO"):
        status, body = raw(d, method + b" /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
                                      b"connection: close\r\n\r\n")
        judged(status, body, method.decode())
    alive(d)


def test_upgrade_requests_are_answered_as_plain_http(d: LiveDaemon) -> None:
    """Nothing here speaks WebSocket (or h2c): an upgrade is the HTTP request it also is, judged by the same
    rules (a WebSocket handshake that the app never accepted used to end in a plain-text 500)."""
    ws = (b"connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
          b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    h2c = b"connection: upgrade, http2-settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
    for extra in (ws, h2c):
        for path in (b"/v1/models", b"/health", b"/v1/nowhere", b"/ui/api/overview"):
            status, body = raw(d, b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n" + extra + b"\r\n")
            judged(status, body, f"{extra[:40]!r} {path!r}")
            if path in (b"/v1/models", b"/health"):
                assert status == 200, body
    alive(d)


def test_oversized_headers_get_431(d: LiveDaemon) -> None:
    status, body = raw(d, get(b"/v1/models", b"x-big: " + b"a" * 100_000 + b"\r\n"))
    assert status == 431, body
    judged(status, body)
    status, body = raw(d, get(b"/v1/models", b"".join(b"x-h%d: v\r\n" % i for i in range(1000))))
    assert status == 431, body
    judged(status, body)
    status, body = raw(d, b"GET /v1/models HTTP/1.1\r\n" + b"x-slow: " + b"b" * 40_000)  # never finished
    assert status == 431
    status, body = raw(d, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)  # TLS to a plain port
    judged(status, body, "tls hello")
    status, body = raw(d, b"GET /v1/models HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n")
    judged(status, body, "negative content-length")
    alive(d)


def test_body_limits(d: LiveDaemon) -> None:
    """Content-Length over the limit: 413 at once, before the body is sent; a chunked body over it: 413 too."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 999999999\r\n\r\n{")
        data = b""
        while chunk := s.recv(65536):  # the connection is closed after the answer: the body is never read
            data += chunk
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    judged(413, data.partition(b"\r\n\r\n")[2])

    def chunks() -> Iterator[bytes]:
        yield b'{"messages": "'
        for _ in range(40):
            yield b"a" * 65536

    r = httpx.post(f"{d.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    alive(d)


def test_stalled_clients_do_not_block_and_are_closed(d: LiveDaemon) -> None:
    """50 connections that stall mid-headers or mid-body: a normal request still flows, and they are closed after
    client_timeout_s (2 s here)."""
    stalled: list[socket.socket] = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        if i % 3 == 0:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")  # headers never end
        elif i % 3 == 1:
            s.sendall(b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"content\"")  # body stalls
        stalled.append(s)  # and every third sends nothing at all
    t0 = time.monotonic()
    alive(d)
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 15
    closed = 0
    for s in stalled:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while s.recv(4096):
                pass
            closed += 1
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
        finally:
            s.close()
    assert closed == 50, f"only {closed} of 50 stalled connections were closed"
    alive(d)
