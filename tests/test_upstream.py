"""The proxy's HTTP/1.1 client (web/api/upstream.py), against small local servers that answer the way
llama-server's HTTP library does (Content-Length, chunked streams, keep-alive) and the ways it can fail."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from supervisor.web.api import upstream
from supervisor.web.api.upstream import ConnectError, Retryable, UpstreamError, UpstreamPool, WriteTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HOST = "127.0.0.1"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, HOST, 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(request head, body) as the server got them."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    return head, await reader.readexactly(length)


def echo(connections: list[int]) -> Handler:
    """Answers each request with its own body (Content-Length), keeping the connection open."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                _, body = await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    return handler


async def post(pool: UpstreamPool, port: int, body: bytes, method: str = "POST") -> upstream.Response:
    return await pool.request(HOST, port, method, b"/v1/x", [(b"host", b"x"), (b"content-length", b"%d" % len(body))],
                              body)


async def test_keep_alive_round_trips_reuse_one_connection(serve) -> None:
    connections: list[int] = []
    port = await serve(echo(connections))
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    for i in range(3):
        r = await post(pool, port, b"x" * i * 100_000)
        assert r.status == 200 and (b"Content-Type", b"application/json") in r.headers
        assert await r.read() == b"x" * i * 100_000
        await r.aclose()
    assert len(connections) == 1 and len(pool.connections) == 1
    await pool.aclose()


async def test_a_request_leaves_in_one_write(serve) -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(65536))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    port = await serve(handler)
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    r = await post(pool, port, b'{"a":1}')
    assert r.status == 204 and await r.read() == b""
    await r.aclose()
    assert got == [b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\n\r\n{\"a\":1}"]
    await pool.aclose()


async def test_a_chunked_stream_arrives_chunk_by_chunk_as_sent(serve) -> None:
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b"data: {\"n\": %d}\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await sent.wait()
            sent.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    port = await serve(handler)
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    r = await post(pool, port, b"{}")
    chunks = []
    async for chunk in r.stream:
        chunks.append(chunk)  # each one came before the server sent the next
        sent.set()
    assert chunks == [b"data: {\"n\": %d}\n\n" % i for i in range(3)]
    await r.aclose()
    assert len(pool.connections) == 1  # the whole response came: kept for the next request
    await pool.aclose()


async def test_informational_responses_are_skipped_and_head_has_no_body(serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, _ = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")  # the length GET would have
            else:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    port = await serve(handler)
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    r = await post(pool, port, b"{}")
    assert r.status == 200 and await r.read() == b"ok"
    await r.aclose()
    assert len(pool.connections) == 1
    r = await asyncio.wait_for(post(pool, port, b"", method="HEAD"), 5)
    assert r.status == 200 and await asyncio.wait_for(r.read(), 5) == b""
    await r.aclose()
    assert pool.connections == []  # llhttp would read the next answer as this one's body: not reused
    await pool.aclose()


async def test_failures_before_the_answer_are_retryable_and_after_it_are_not(serve) -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async def cut_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    with pytest.raises(Retryable, match="before answering"):
        await post(pool, await serve(close_at_once), b"{}")
    r = await post(pool, await serve(cut_mid_body), b"{}")
    assert r.status == 200
    with pytest.raises(UpstreamError, match="mid-response") as exc:
        await r.read()
    assert not isinstance(exc.value, Retryable)
    await r.aclose()
    with pytest.raises(UpstreamError, match="not HTTP"):
        await post(pool, await serve(garbage), b"{}")
    with socket.socket() as s:
        s.bind((HOST, 0))
        free = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ConnectError):
            await post(pool, free, b"{}")
    assert pool.connections == []
    await pool.aclose()


async def test_a_response_left_early_closes_its_connection(serve) -> None:
    closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:  # llama-server generating until the connection goes
                writer.write(b"5\r\ntoken\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            closed.set()

    port = await serve(endless)
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    r = await post(pool, port, b"{}")
    async for _ in r.stream:
        break
    await r.aclose()
    await asyncio.wait_for(closed.wait(), 5)  # the server saw the client go: it stops generating
    assert pool.connections == []
    await pool.aclose()


async def test_idle_connections_are_few_and_short_lived(serve) -> None:
    connections: list[int] = []
    port = await serve(echo(connections))
    pool = UpstreamPool(max_idle=2, idle_s=0.2)
    responses = await asyncio.gather(*(post(pool, port, b"x") for _ in range(5)))
    assert len(pool.connections) == 5
    for r in responses:
        await r.read()
        await r.aclose()
    assert len(pool.connections) == 2  # the rest closed on the way back
    await asyncio.sleep(0.3)
    r = await post(pool, port, b"y")  # the idle two are too old: a new connection
    await r.read()
    await r.aclose()
    assert len(connections) == 6 and len(pool.connections) == 1
    await pool.aclose()


async def test_a_server_that_closes_an_idle_connection_is_not_reused(serve) -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive timeout on the server's side

    port = await serve(one_answer)
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    for _ in range(3):
        r = await post(pool, port, b"{}")
        assert await r.read() == b"ok"
        await r.aclose()
        await asyncio.sleep(0.05)  # the close arrives
        assert pool.connections == []
    await pool.aclose()


async def test_a_slow_reader_pauses_the_upstream(serve, monkeypatch) -> None:
    monkeypatch.setattr(upstream, "HIGH_WATER", 64 * 1024)
    written = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 16384
        for _ in range(2000):  # 32 MB if nothing held it back
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            written += len(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    port = await serve(firehose)
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    r = await post(pool, port, b"{}")
    await asyncio.sleep(0.5)  # nobody reads: the client stops reading, the socket buffers fill, the server waits
    assert r._buffered <= 2 * upstream.HIGH_WATER and written < 16 * 1024 * 1024
    total = sum([len(c) async for c in r.stream])  # reading again resumes it
    assert total == 2000 * 16384
    await r.aclose()
    await pool.aclose()


async def test_a_body_llama_server_does_not_take_times_out(serve, monkeypatch) -> None:
    monkeypatch.setattr(upstream, "WRITE_TIMEOUT_S", 0.3)

    async def deaf(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)  # reads nothing: the request's bytes pile up

    port = await serve(deaf)
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    with pytest.raises(WriteTimeout):
        await post(pool, port, b"x" * (64 * 1024 * 1024))
    assert pool.connections == []
    await pool.aclose()


async def test_fetch_for_the_context_guard(serve) -> None:
    connections: list[int] = []
    port = await serve(echo(connections))
    pool = UpstreamPool(max_idle=4, idle_s=4.0)
    assert await pool.fetch(f"http://{HOST}:{port}", "POST", "/tokenize", b'{"content":"x"}', 5) == (
        200, b'{"content":"x"}')

    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()

    with pytest.raises(UpstreamError, match="no answer within"):
        await pool.fetch(f"http://{HOST}:{await serve(silent)}", "GET", "/props", None, 0.2)
    await pool.aclose()
