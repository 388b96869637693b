"""The ops page's rings: samples, timeline events and log lines (bounded, ordered, resumable)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest

from supervisor.core.crash import Cause, Verdict
from supervisor.core.ladder import Evidence, RunSettings
from supervisor.core.lifecycle import (
    BackoffElapsed,
    ChildExited,
    ChildGone,
    Healthy,
    Policy,
    Start,
    WarmedUp,
    initial,
    transition,
)
from supervisor.telemetry.events import Timeline, child_level
from supervisor.telemetry.logring import LogRing
from supervisor.telemetry.metrics import Metrics
from supervisor.telemetry.sampler import Sampler, Source, quantile, rates, read_counters
from supervisor.telemetry.series import SeriesRing
from supervisor.web.ops.logstream import LogStream

# ---- series ring ------------------------------------------------------------------------------------


def test_series_ring_is_bounded_and_ordered() -> None:
    ring = SeriesRing(5)
    ring.append(-1.0, {"a": -1})
    size = ring.nbytes()
    for i in range(12):
        ring.append(float(i), {"a": i, **({"late": i} if i >= 10 else {})})
    assert ring.count == 5
    out = ring.export(ring.rows_after(0))
    assert out["t"] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert out["series"]["a"] == [7, 8, 9, 10, 11]
    assert out["series"]["late"] == [None, None, None, 10, 11]  # a series that appears later has no past
    assert ring.export(ring.rows_after(9.0))["t"] == [10.0, 11.0]
    assert ring.nbytes() == size + 5 * 8  # memory grows by a column, never by rows


def test_summary_keeps_the_worst_high_percentile() -> None:
    ring = SeriesRing(10)
    for i, v in enumerate([1.0, 3.0, None]):
        ring.append(float(i), {"x": v, "lat_p99@m": v, "empty": None})
    s = ring.summary_of_last(3)
    assert s["x"] == 2.0 and s["lat_p99@m"] == 3.0 and s["empty"] is None


@pytest.mark.parametrize(("q", "buckets", "want"), [
    (0.5, [(0.1, 0.0), (0.2, 10.0), (math.inf, 10.0)], 0.15),  # halfway into the (0.1, 0.2] bucket
    (0.99, [(0.1, 5.0), (0.2, 5.0), (math.inf, 10.0)], 0.2),  # in +Inf: the highest finite bound
    (0.5, [(0.1, 10.0), (math.inf, 10.0)], 0.05),  # first bucket: from 0
    (0.5, [(0.1, 0.0), (math.inf, 0.0)], None),  # nothing observed
    (0.5, [], None),
])
def test_quantile_from_buckets(q: float, buckets: list[tuple[float, float]], want: float | None) -> None:
    got = quantile(q, buckets)
    assert got == pytest.approx(want) if want is not None else got is None


def test_rates_come_from_the_same_counters_as_metrics() -> None:
    m = Metrics()
    before = read_counters(m)
    m.tokens.labels("prompt").inc(40)
    m.tokens.labels("completion").inc(100)
    for status in ("200", "200", "404", "499", "502"):
        m.requests.labels("/v1/chat/completions", status).inc()
    for s in (0.004, 0.02, 0.02, 0.3):
        m.latency.labels("/v1/chat/completions").observe(s)
    m.queue_wait.observe(0.5)
    m.queue_wait.observe(1.5)
    m.queued.inc()
    row = rates("demo", before, read_counters(m), 2.0)
    assert row["prompt_tps@demo"] == 20 and row["completion_tps@demo"] == 50
    assert (row["rps_2xx@demo"], row["rps_4xx@demo"], row["rps_5xx@demo"]) == (1.0, 1.0, 0.5)
    assert 10 < row["lat_p50@demo"] <= 25 and 250 < row["lat_p99@demo"] <= 500  # type: ignore[operator]
    assert row["queue_wait_ms@demo"] == pytest.approx(1000)
    assert row["queued@demo"] == 1
    assert row["loop_ms@demo"] is None  # no answered loop probe yet: no point, rather than a made-up 0
    m.loop_probes.labels("alive").inc()
    m.loop_latency.set(0.0042)
    assert rates("demo", before, read_counters(m), 2.0)["loop_ms@demo"] == pytest.approx(4.2)
    first = rates("demo", None, read_counters(m), 0.0)
    assert "prompt_tps@demo" not in first  # no rate without a previous reading


async def test_sampler_rows_and_export_window() -> None:
    m = Metrics()
    sampler = Sampler(lambda: [Source("demo", m, None)], interval_s=1.0, fine_s=5, coarse_every_s=2)
    for _ in range(7):
        m.tokens.labels("completion").inc(10)
        await sampler.sample_once()
    assert sampler.fine.count == 5 and sampler.coarse.count == 3
    out = sampler.export(60)  # beyond the fine ring: the coarse one answers
    assert out["interval_s"] == 2.0 and len(out["t"]) == 3
    fine = sampler.export(5)
    assert fine["interval_s"] == 1.0
    assert fine["series"]["sup_rss_mb"][-1] > 10  # this very process
    assert all(v > 0 for v in fine["series"]["completion_tps@demo"])
    assert sampler.export(5, since=fine["t"][-1])["t"] == []


# ---- timeline ---------------------------------------------------------------------------------------


def test_timeline_records_exits_state_changes_and_ladder_steps() -> None:
    tl = Timeline(LogRing())
    p = Policy(backoff_base_s=0.1)
    m = initial(RunSettings(n_gpu_layers=20, ctx_size=4096))

    def step(ev: Any) -> None:
        nonlocal m
        new, _ = transition(m, ev, p)
        tl._record("demo", m, new)
        m = new

    step(Start(1.0))
    step(Healthy(2.0, 1))
    step(WarmedUp(3.0, 1))
    step(ChildGone(4.0, 1))
    step(ChildExited(4.0, 1, Verdict(Cause.OOM_COMPUTE, "CUDA error: out of memory"), -6,
                     Evidence(model_layers=20, compute=True)))
    step(BackoffElapsed(5.0, 1))
    kinds = [(e["kind"], e["title"]) for e in tl.events]
    assert kinds[:3] == [("state", "stopped → starting"), ("state", "starting → warming"), ("state", "warming → ready")]
    exit_ev = next(e for e in tl.events if e["kind"] == "exit")
    assert exit_ev["title"] == "exit: oom_compute (SIGABRT)" and exit_ev["detail"] == "CUDA error: out of memory"
    ladder = next(e for e in tl.events if e["kind"] == "ladder")
    assert ladder["title"] == "ladder step" and ladder["changed"]["n_gpu_layers"] == [20, 10]
    assert [e["id"] for e in tl.events] == sorted(e["id"] for e in tl.events)
    assert tl.exits["demo"]["oom_compute"] == 1
    assert [e["kind"] for e in tl.after(exit_ev["id"] - 1)][:1] == ["exit"]


def test_timeline_is_bounded_and_records_reloads() -> None:
    tl = Timeline(LogRing(), maxlen=3)
    for i in range(5):
        tl.add("demo", "state", f"s{i}")
    tl.reloaded("api", {"ok": False, "errors": [{"file": "/p/demo.yaml",
                                                 "errors": [{"field": "ctx_size", "message": "bad"}]}]})
    assert len(tl.events) == 3
    last = tl.events[-1]
    assert last["title"] == "reload rejected" and last["model"] == "demo"
    assert last["detail"] == "/p/demo.yaml: ctx_size: bad"
    tl.reloaded("api", {"ok": True, "restarted": ["demo"]})
    assert tl.events[-1]["title"] == "reload: restart"
    tl.reloaded("SIGHUP", {"ok": True, "default": "demo"})  # an operator's reload that changed nothing says so
    assert tl.events[-1]["title"] == "reload: no change"


@pytest.mark.parametrize(("line", "level"), [
    ("main: server is listening on http://127.0.0.1:1234", "info"),
    ("llama_model_load: error loading model: unable to allocate CUDA0 buffer", "error"),
    ("warning: no usable GPU found", "warning"),
    ("0.01.798.769 W slot   operator(): id  1 | task 101 | need to evaluate at least 1 token", "warning"),
    ("0.01.793.723 I slot print_timing: id  1 | prompt eval time", "info"),
    ("0.00.012.001 E main: failed to load", "error"),
    ("0.00.012.001 D sampling params", "debug"),
])
def test_child_line_levels(line: str, level: str) -> None:
    assert child_level(line) == level


# ---- log ring and /logs/stream ----------------------------------------------------------------------


def test_log_ring_is_bounded_and_reports_gaps() -> None:
    ring = LogRing(maxlen=100, max_chars=50)
    for i in range(1000):
        ring.append("child", "info", f"line {i}" + ("x" * 500 if i == 999 else ""))
    assert len(ring.lines) == 100 and ring.last_id == 1000
    assert len(ring.lines[-1].text) < 60
    lines, missed = ring.after(850)
    assert [ln.id for ln in lines] == list(range(901, 1001)) and missed == 50
    lines, missed = ring.after(950)
    assert lines[0].id == 951 and missed == 0


class _Client:
    """Drives an ASGI app like a server would, collecting what it sends."""

    def __init__(self) -> None:
        self.body = b""
        self.status: int | None = None
        self.gone = asyncio.Event()
        self.more = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            self.status = msg["status"]
        else:
            self.body += msg.get("body", b"")
            self.more.set()

    def events(self) -> list[tuple[str, str | None, Any]]:
        out = []
        for block in self.body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line and not line.startswith(":"))
            if "event" in fields:
                out.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
        return out


def _scope(query: str = "", last_id: int | None = None) -> dict[str, Any]:
    headers = [(b"last-event-id", str(last_id).encode())] if last_id is not None else []
    return {"type": "http", "method": "GET", "path": "/logs/stream", "query_string": query.encode(),
            "headers": headers}


async def _open(stream: LogStream, scope: dict[str, Any]) -> tuple[_Client, asyncio.Task[None]]:
    c = _Client()
    task = asyncio.ensure_future(stream(scope, c.receive, c.send))
    await asyncio.wait_for(c.more.wait(), 5)
    return c, task


async def test_log_stream_tail_live_filter_and_resume() -> None:
    ring = LogRing(maxlen=50)
    stream = LogStream(ring, keepalive_s=0.05)
    for i in range(10):
        ring.append("child" if i % 2 else "supervisor", "warning" if i == 7 else "info", f"l{i}")
    c, task = await _open(stream, _scope("n=3"))
    assert c.status == 200
    assert [e[2]["text"] for e in c.events()] == ["l7", "l8", "l9"]
    c.more.clear()
    ring.append("child", "info", "live one")
    await asyncio.wait_for(c.more.wait(), 5)
    ev = c.events()
    assert ev[-1][2]["text"] == "live one" and ev[-1][1] == "11"
    assert [int(e[1]) for e in ev] == sorted(int(e[1]) for e in ev)
    c.gone.set()
    await asyncio.wait_for(task, 5)
    assert stream.open == 0

    ring.append("child", "info", "missed while away")
    c, task = await _open(stream, _scope(last_id=11))  # what EventSource sends on reconnect
    assert [e[2]["text"] for e in c.events()] == ["missed while away"]
    c.gone.set()
    await asyncio.wait_for(task, 5)

    c, task = await _open(stream, _scope("n=2", last_id=10_000))  # an id from before a supervisor restart
    assert [e[2]["text"] for e in c.events()] == ["live one", "missed while away"]
    c.gone.set()
    await asyncio.wait_for(task, 5)

    c, task = await _open(stream, _scope("n=50&source=child&level=warning"))
    assert [e[2]["text"] for e in c.events()] == ["l7"]
    c.gone.set()
    await asyncio.wait_for(task, 5)


async def test_log_stream_gap_bad_params_limit_and_close() -> None:
    ring = LogRing(maxlen=5)
    stream = LogStream(ring, keepalive_s=0.05, max_streams=1)
    for i in range(20):
        ring.append("child", "info", f"l{i}")
    c, task = await _open(stream, _scope("last_id=3"))
    ev = c.events()
    assert ev[0][0] == "gap" and ev[0][2] == {"missed": 12}
    assert [e[2]["text"] for e in ev[1:]] == [f"l{i}" for i in range(15, 20)]
    second = _Client()
    await stream(_scope(), second.receive, second.send)
    assert second.status == 503  # one stream allowed here
    bad = _Client()
    stream.max_streams = 5
    await stream(_scope("level=loud"), bad.receive, bad.send)
    assert bad.status == 400 and b"bad parameter" in bad.body
    stream.close()  # shutdown: open streams end by themselves
    await asyncio.wait_for(task, 5)
