"""uvicorn's httptools protocol with the limits it lacks: header size and count (431), clients that stall while
sending a request (cut off after `client_timeout_s` of silence), and JSON bodies for HTTP-level errors.

uvicorn has no header limits with httptools (h11's `h11_max_incomplete_event_size` bounds only h11, which costs
more per request) and no read timeout: `timeout_keep_alive` covers only the idle time between requests, so a
connection that sends half a request and then nothing stays open forever.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import error_doc


class _Refused(Exception):
    pass


def _response(status: int, message: str, kind: str = "invalid_request_error") -> bytes:
    body = json.dumps(error_doc(status, message, kind)).encode()
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body])


class GuardedHttpTools(HttpToolsProtocol):
    max_header_bytes = 32 * 1024
    max_headers = 100
    client_timeout_s = 30.0

    @classmethod
    def configured(cls, max_header_bytes: int, max_headers: int, client_timeout_s: float) -> type[GuardedHttpTools]:
        return type("GuardedHttpTools", (cls,), {"max_header_bytes": max_header_bytes, "max_headers": max_headers,
                                                 "client_timeout_s": client_timeout_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: tuple[int, str] | None = None
        self._reading = True  # waiting for (the rest of) a request: the stall clock runs
        self._header_bytes = self._header_count = self._raw = 0
        self._last_data = self.loop.time()
        self._stall: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._stall is None:
            self._stall = self.loop.call_later(self.client_timeout_s, self._check_stall)

    def _check_stall(self) -> None:
        self._stall = None
        if self.transport.is_closing() or not self._reading:
            return
        now = self.loop.time()
        if self.flow.read_paused:  # we stopped reading, not the client
            self._last_data = now
        silent = now - self._last_data
        if silent < self.client_timeout_s:
            self._stall = self.loop.call_later(self.client_timeout_s - silent, self._check_stall)
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_response(408, f"client sent nothing for {self.client_timeout_s:g} s while sending "
                                                "a request (client_timeout_s)"))
        self.transport.close()  # mid-body: the application sees a disconnect

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)
        # Still in the headers after feeding: every byte since the request began was request line or headers
        # (httptools buffers an unfinished header line itself, so this bounds that buffer too).
        if self._header_count >= 0 and self._refusal is None and not self.transport.is_closing():
            self._raw += len(data)
            if self._raw > self.max_header_bytes:
                self._refuse(431, f"request line and headers over {self.max_header_bytes} bytes (max_header_bytes)")

    def _refuse(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        self.send_400_response(message)

    def send_400_response(self, msg: str) -> None:
        status, message = self._refusal or (400, "invalid HTTP request: the request line or a header is malformed")
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_response(status, message))
        self.transport.close()

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading, self._header_bytes, self._header_count, self._raw = True, 0, 0, 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refusal = (431, f"more than {self.max_headers} request headers (max_headers)")
            raise _Refused
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            self._refusal = (431, f"request line and headers over {self.max_header_bytes} bytes (max_header_bytes)")
            raise _Refused

    def on_headers_complete(self) -> None:
        self._header_count = -1  # headers done: bytes from here on are body
        try:
            super().on_headers_complete()
        except UnicodeDecodeError:
            self._refusal = (400, "the request path must be ASCII (percent-encode other bytes)")
            raise _Refused from None

    def on_message_complete(self) -> None:
        self._reading = False
        super().on_message_complete()


def protocol_class(cfg: Any) -> type[GuardedHttpTools]:
    return GuardedHttpTools.configured(cfg.max_header_bytes, cfg.max_headers, cfg.client_timeout_s)
