"""What the child prints: each of its pipes read by an asyncio protocol, whole lines handed on a read at a time.

llama-server prints about ten lines per request, one write each. Read as they come, every line cost the
supervisor a wakeup, a read and its handling (scripts/bench.py, CPU per request: a third of the supervisor's
CPU per request, with requests sent straight to llama-server costing the supervisor 0.5 ms each for its lines
alone). Once the child serves, a pipe is read at most every `coalesce_s`: after a read it stops reading for that
long, and the lines printed meanwhile wait in the pipe and come in one read, handled together. A read that
filled the buffer is not followed by a pause (more is waiting), and the child's exit ends any pause at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

COALESCE_S = 0.02  # once the child serves: its lines reach the log and the ops page at most this late
LINE_MAX = 1 << 20  # a longer "line" (a binary blob on stdout?) goes on in pieces of about this size
_FULL_READ = 64 * 1024  # a read at least this big: the pipe may hold more, read again at once


class PipeLines(asyncio.Protocol):
    """One pipe of the child: bytes in, whole lines out to `sink(lines)` (each read's complete lines at once)."""

    def __init__(self, sink: Callable[[list[bytes]], None], pace: Callable[[], float]) -> None:
        self.sink = sink
        self.pace = pace  # seconds to wait after a read before the next one (0: read as it comes)
        self.transport: asyncio.ReadTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending = b""
        self._resume: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.ReadTransport, transport)  # a pipe's

    def data_received(self, data: bytes) -> None:
        *complete, self._pending = (self._pending + data).split(b"\n") if self._pending else data.split(b"\n")
        if len(self._pending) > LINE_MAX:
            complete.append(self._pending)
            self._pending = b""
        if complete:
            self.sink(complete)
        wait = self.pace()
        if wait > 0 and len(data) < _FULL_READ and self._resume is None and self.transport is not None:
            self.transport.pause_reading()
            self._resume = asyncio.get_running_loop().call_later(wait, self.resume)

    def resume(self) -> None:
        """Read again now (the pause is over, or the child has exited and its last lines are wanted)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._pending:
            self.sink([self._pending])
            self._pending = b""
        if not self.done.done():
            self.done.set_result(None)
