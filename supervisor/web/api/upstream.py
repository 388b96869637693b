"""The proxy's HTTP/1.1 client for its loopback hop to llama-server: asyncio protocols and httptools' C parser.

The proxy used httpcore (with h11, a pure-Python HTTP parser, and its own connection pool and locks). Measured
with a CPU-time profile of the supervisor under 8-token chats on keep-alive connections, httpcore with h11 and
anyio's locks took about half of the supervisor's CPU per request, and h11's parsing of every streamed chunk was
most of the cost per streamed token. Here a response is parsed by llhttp (httptools, which uvicorn already uses
for the client side), a request leaves in one write, and a body chunk reaches the relay as one bytes object per
`data_received`, with no Python parsing of its own.

What the proxy relies on, kept from before: keep-alive connections, few of them idle and not for long (every idle
connection pins one of llama-server's fixed HTTP threads, see proxy.KEEPALIVE_IDLE); an error before the response
began says the request may be sent again (`Retryable`); a body read from a slow client is flow-controlled (reading
pauses while more than HIGH_WATER bytes wait); a response abandoned before its end closes the connection, so
llama-server stops generating.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

CONNECT_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 60.0
HIGH_WATER = 256 * 1024  # body bytes read but not yet taken: above this, stop reading from llama-server


class UpstreamError(Exception):
    """llama-server's connection failed or broke the protocol."""


class Retryable(UpstreamError):
    """It failed before any of the response arrived (refused, reset, closed): the request may be sent again."""


class ConnectError(Retryable):
    pass


class WriteTimeout(UpstreamError):
    pass


class Response:
    """One response. `status` and `headers` (as received) are there when `request()` returns; the body is
    `stream` (an async iterator of chunks as they arrive) or `read()`; `aclose()` gives the connection back when
    the response came in full, and closes it otherwise."""

    def __init__(self, conn: _Connection, head: bool) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = head  # a response to HEAD has no body, whatever its Content-Length says
        self.complete = False
        self.error: UpstreamError | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def stream(self) -> Response:
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._conn.reading_paused and self._buffered <= HIGH_WATER // 2:
            self._conn.resume_reading()
        return chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        self._conn.finished(self)

    # ---- fed by the connection -------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _body(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._conn.reading_paused:
            self._conn.pause_reading()
        self._wake()

    def _end(self, error: UpstreamError | None = None) -> None:
        if not self.complete and self.error is None:
            if error is None:
                self.complete = True
            else:
                self.error = error
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request on it at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reusable = True
        self.reading_paused = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self._head: asyncio.Future[None] | None = None  # the response's status line and headers are in
        self._drained: asyncio.Future[None] | None = None
        self._sized = False  # Content-Length or chunked: the end is in the body, not at the connection's close

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing asked: a server that talks out of turn is not reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"llama-server answered something that is not HTTP/1.1: {exc}"))

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        resp = self.response
        if resp is not None and resp.status and not self._sized and not resp.complete:
            resp._end()  # a body without a length ends where the connection does
        why = f": {exc}" if exc else ""
        if resp is None or not resp.status:
            self._fail(Retryable(f"llama-server closed the connection before answering{why}"))
        else:
            self._fail(UpstreamError(f"llama-server closed the connection mid-response{why}"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(Retryable(f"llama-server closed the connection{why}"))

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # ---- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        assert self.response is not None
        self.response.headers = []
        self._sized = False

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self._sized = True

    def on_headers_complete(self) -> None:
        resp = self.response
        assert resp is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue and the like: the real answer follows
            return
        resp.status = status
        if not self.parser.should_keep_alive():
            self.reusable = False
        if resp.head:  # llhttp would wait for the body a HEAD response never has: not reusable after this
            self.reusable = False
            resp._end()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        resp = self.response
        assert resp is not None
        if resp.status and not resp.head:
            resp._body(body)

    def on_message_complete(self) -> None:
        resp = self.response
        if resp is not None and resp.status:
            resp._end()

    # ---- the request ------------------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self.response is not None:
            self.response._end(error)
        self.close()

    async def exchange(self, data: bytes, head: bool) -> Response:
        """Send one request (its bytes, whole) and wait for the response's head."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.response = resp = Response(self, head)
        self._head = loop.create_future()
        self.transport.write(data)
        try:
            if self._drained is not None:  # a big body the socket has not taken yet
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await self._drained
            await self._head
        except TimeoutError:
            self.close()
            raise WriteTimeout(f"llama-server took no request data for {WRITE_TIMEOUT_S:g} s") from None
        except BaseException:
            self.close()  # cancelled, or failed: this connection's state is unknown
            raise
        finally:
            self._head = None
        return resp

    def finished(self, resp: Response) -> None:
        """The proxy is done with `resp`: give the connection back if the exchange ended cleanly."""
        if self.response is not resp:
            return
        self.response = None
        if resp.complete and resp.error is None and self.reusable and not self.closed:
            self.pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        self.reusable = False
        self.pool.forget(self)
        if self.transport is not None and not self.closed:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to llama-server: at most `max_idle` kept idle, none for longer than `idle_s`."""

    def __init__(self, max_idle: int, idle_s: float) -> None:
        self.max_idle, self.idle_s = max_idle, idle_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()

    @property
    def connections(self) -> list[_Connection]:
        """Every open connection, idle or in use."""
        return [c for idle in self._idle.values() for c in idle] + list(self._busy)

    async def request(self, host: str, port: int, method: str, target: bytes,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """Send one request; the response comes back once its status line and headers are in. Raises Retryable
        when it failed before any of the response arrived (nothing was done: the request may go again)."""
        head = b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target)
        data = b"".join([head, *[b"%s: %s\r\n" % kv for kv in headers], b"\r\n", body])
        while True:
            # An idle connection may have been closed by llama-server (its keep-alive timeout, or the child's
            # end) before the event loop heard of it: one that fails before any answer is dropped and the
            # request goes on another, as httpcore's pool does. Only a fresh connection's failure is the caller's.
            conn = self._take((host, port))
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port)
            self._busy.add(conn)
            try:
                return await conn.exchange(data, head=method == "HEAD")
            except Retryable:
                self._busy.discard(conn)
                conn.close()
                if not reused:
                    raise
            except BaseException:
                self._busy.discard(conn)
                raise

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be timed out by llama-server
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn
            conn.close()
        return None

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, conn = await loop.create_connection(lambda: _Connection(self, (host, port)), host, port)
        except TimeoutError:
            raise ConnectError(f"llama-server did not accept a connection within {CONNECT_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to llama-server: {exc}") from None
        conn.transport = transport  # uvloop may call connection_made only after this returns
        return conn  # asyncio sets TCP_NODELAY on TCP connections itself

    def give_back(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        idle = self._idle.setdefault(conn.key, [])
        now = asyncio.get_running_loop().time()
        conn.idle_since = now
        # Expired ones first, then the oldest beyond max_idle.
        for old in [c for c in idle if now - c.idle_since >= self.idle_s]:
            idle.remove(old)
            old.close()
        idle.append(conn)
        while len(idle) > self.max_idle:
            idle.pop(0).close()

    def forget(self, conn: _Connection) -> None:
        """A connection closed: it is neither idle nor busy any more."""
        self._busy.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def send(self, base: str | None, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> Response:
        """`request` to the child at `base` (`http://host:port`), with its Host and Content-Length; Retryable when
        the child is gone (None: it went since the caller last looked)."""
        if base is None:
            raise Retryable("llama-server is gone")
        host, _, port = base.removeprefix("http://").partition(":")
        return await self.request(host, int(port or 80), method, target,
                                  [(b"host", f"{host}:{port}".encode()), *headers,
                                   (b"content-length", b"%d" % len(body))], body)

    async def fetch(self, base: str, method: str, path: str, body: bytes | None, timeout_s: float,
                    content_type: bytes = b"application/json") -> tuple[int, bytes]:
        """A whole small exchange (the context guard's calls): (status, body), within `timeout_s`."""
        host, _, port = base.removeprefix("http://").partition(":")
        headers = [(b"host", f"{host}:{port}".encode())]
        if body is not None:
            headers += [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.request(host, int(port or 80), method, path.encode(), headers, body or b"")
                try:
                    return resp.status, await resp.read()
                finally:
                    await resp.aclose()
        except TimeoutError:
            raise UpstreamError(f"{method} {path}: no answer within {timeout_s:g} s") from None

    async def aclose(self) -> None:
        for conn in self.connections:
            conn.close()
        self._idle.clear()
        self._busy.clear()
