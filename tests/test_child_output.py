"""The child's output: read a burst at a time, every line kept whole, echoed to the log in one write per burst."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time

import structlog

from supervisor.child import output
from supervisor.child.process import spawn
from supervisor.telemetry import logs


class CountingStream(io.StringIO):
    """stderr that counts its writes (what reaches journald's pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_child_lines_render_as_structlog_does_in_one_write(monkeypatch) -> None:
    """The hand-rendered JSON of llama-server's lines is the line structlog's processors would make (the same
    keys in the same order, the same escapes), and a burst is one write."""
    out = CountingStream()
    monkeypatch.setattr(sys, "stderr", out)
    try:
        logs.setup("json", "info")
        line = 'slot "a" \u00e9\x01 \\ end'
        structlog.get_logger("child").info("child_output", stream="stderr", pid=42, line=line)
        logs.child_lines("stderr", 42, [line, "second"])
        via_structlog, *ours = [json.loads(x) for x in out.getvalue().splitlines()]
        assert out.writes == 2
        raw = out.getvalue().splitlines()
        assert [list(d) for d in ours] == [list(via_structlog)] * 2
        assert raw[1].split(', "timestamp"')[0] == raw[0].split(', "timestamp"')[0]
        assert ours[1]["line"] == "second" and ours[0]["timestamp"].endswith("Z")
        logs.setup("json", "warning")  # filtered as structlog would filter an info line
        logs.child_lines("stderr", 42, ["not shown"])
        assert "not shown" not in out.getvalue()
    finally:
        monkeypatch.setattr(logs._Output, "writer", None)
        structlog.reset_defaults()


# Prints lines split across writes (a line in three pieces, a burst of lines in one write, blank lines, invalid
# UTF-8, a line longer than LINE_MAX) and ends without a final newline.
CHATTY = r"""
import os, sys, time
w = lambda b: (os.write(1, b), time.sleep(0.05))
w(b"first li"); w(b"ne in thr"); w(b"ee pieces\n")
w(b"burst 1\nburst 2\n\n  \nburst 3\n")
w(b"bad \xff byte\n")
for _ in range(5): w(b"y" * 600)
w(b"\n")
w(b"no newline at the end")
"""


async def test_lines_are_whole_whatever_the_reads_and_echoed_per_burst(monkeypatch) -> None:
    monkeypatch.setattr(output, "LINE_MAX", 1000)
    out = CountingStream()
    monkeypatch.setattr(sys, "stderr", out)
    seen: list[str] = []
    try:
        logs.setup("json", "info")
        child = await spawn([sys.executable, "-c", CHATTY], {}, on_lines=seen.extend)
        assert await child.wait() == 0
    finally:
        monkeypatch.setattr(logs._Output, "writer", None)
        structlog.reset_defaults()
    # The 3000-byte line came in pieces of 600 and went on in pieces, each once over LINE_MAX (1000).
    pieces = [line for line in seen if line.startswith("y")]
    assert "".join(pieces) == "y" * 3000 and len(pieces) >= 2 and all(len(p) <= 3000 for p in pieces)
    expected = ["first line in three pieces", "burst 1", "burst 2", "burst 3", "bad \ufffd byte", *pieces,
                "no newline at the end"]
    assert seen == expected
    assert list(child.tail) == expected
    echoed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["line"] for e in echoed] == expected
    assert {e["event"] for e in echoed} == {"child_output"} and {e["stream"] for e in echoed} == {"stdout"}
    assert out.writes < len(expected)  # the burst of three lines went out in one write


# Twenty lines, each its own write, 5 ms apart, then the exit.
STEADY = r"""
import os, time
time.sleep(0.3)
for i in range(20):
    os.write(2, b"line %d\n" % i)
    time.sleep(0.005)
"""


async def test_a_serving_child_is_read_in_bursts_and_its_exit_ends_the_pause() -> None:
    reads: list[list[str]] = []
    child = await spawn([sys.executable, "-c", STEADY], {}, on_lines=reads.append, echo=False)
    child.coalesce_s = 30.0  # what the driver sets once the child serves, much longer here
    t0 = time.monotonic()
    assert await asyncio.wait_for(child.wait(), 10) == 0
    assert time.monotonic() - t0 < 5  # the exit cut the pause short: the last lines were read at once
    assert [line for read in reads for line in read] == [f"line {i}" for i in range(20)]
    assert len(reads) <= 3  # the first line, then the rest in one read (two if a read fell between writes)
    assert list(child.tail)[-1] == "line 19"
