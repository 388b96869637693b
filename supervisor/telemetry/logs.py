"""structlog setup: JSON lines for journald and files, readable colours on a terminal."""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

import structlog

from .logring import capture

_child_log = structlog.get_logger("child")


class LineWriter:
    """structlog's logger: each rendered line written and flushed at once, as structlog's PrintLogger does, and
    `lines()` for many in one write."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = threading.Lock()  # structlog may log from worker threads: whole lines, never interleaved

    def msg(self, message: str) -> None:
        with self._lock:
            self._file.write(message + "\n")
            self._file.flush()

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg

    def lines(self, messages: list[str]) -> None:
        with self._lock:
            self._file.write("\n".join(messages) + "\n")
            self._file.flush()


class _Output:
    writer: LineWriter | None = None  # set by setup()
    json = False
    level = logging.INFO


def child_lines(stream: str, pid: int, lines: list[str]) -> None:
    """llama-server's lines, logged as `child_output` events. It prints about ten a request, in bursts; through
    structlog's processors, one write each, they took ~0.15 ms of CPU per request plus a write to journald's pipe
    per line (scripts/bench.py, CPU per request). For JSON output the event is rendered here, as the processors in
    setup() render it (same keys and order; one timestamp per burst), and a burst is one write."""
    out = _Output
    if out.level > logging.INFO:
        return
    if out.writer is None or not out.json:  # the console (a person reading), or before setup (tests)
        for line in lines:
            _child_log.info("child_output", stream=stream, pid=pid, line=line)
        return
    ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    head = f'{{"stream": {json.dumps(stream)}, "pid": {pid}, "line": '
    tail = f', "event": "child_output", "level": "info", "timestamp": "{ts}"}}'
    out.writer.lines([head + json.dumps(line) + tail for line in lines])


def setup(fmt: str = "auto", level: str = "info") -> None:
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    writer = LineWriter(sys.stderr)
    _Output.writer, _Output.json, _Output.level = writer, json_out, getattr(logging, level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            capture,  # a copy of each line for the ops page's live log (/logs/stream)
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_Output.level),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=True,
    )
    # uvicorn and httpx use the standard library; keep their noise at warning and in the same stream.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
