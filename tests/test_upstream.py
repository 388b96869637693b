"""The proxy's asyncio network backend for httpcore, against small local servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpcore
import pytest

from supervisor.web.api.upstream import AsyncioBackend

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


async def test_writes_are_held_until_the_response_is_read(serve) -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.write(b"pong")
        await writer.drain()
        writer.close()

    port = await serve(handler)
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
    await stream.write(b"POST / HTTP/1.1\r\n\r\n")
    await stream.write(b"body")
    await asyncio.sleep(0.05)
    assert received == []  # nothing has left yet: headers and body go together
    assert await stream.read(1024, timeout=5) == b"pong"
    assert received == [b"POST / HTTP/1.1\r\n\r\nbody"]
    await stream.aclose()


async def test_a_connection_the_server_closed_reads_as_readable(serve) -> None:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    port = await serve(handler)
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
    for _ in range(100):
        if stream.get_extra_info("is_readable"):
            break
        await asyncio.sleep(0.01)
    assert stream.get_extra_info("is_readable")  # httpcore then drops it from the pool instead of reusing it
    assert await stream.read(1024) == b""
    await stream.aclose()


async def test_an_open_idle_connection_is_not_readable(serve) -> None:
    async def handler(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()

    port = await serve(handler)
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
    await asyncio.sleep(0.05)
    assert not stream.get_extra_info("is_readable")
    await stream.aclose()


async def test_errors_are_httpcore_errors(serve) -> None:
    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()

    port = await serve(silent)
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
    with pytest.raises(httpcore.ReadTimeout):
        await stream.read(1024, timeout=0.05)
    await stream.aclose()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(httpcore.ConnectError):
            await AsyncioBackend().connect_tcp("127.0.0.1", free, timeout=5)


async def test_httpcore_pool_round_trip(serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    port = await serve(handler)
    async with httpcore.AsyncConnectionPool(network_backend=AsyncioBackend()) as pool:
        for i in range(3):  # the same keep-alive connection, three times
            r = await pool.request("POST", f"http://127.0.0.1:{port}/", content=b"x" * i * 1000)
            assert r.status == 200 and r.content == b"x" * i * 1000
        assert len(pool.connections) == 1
