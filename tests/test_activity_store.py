"""The activity log's store on its own (real SQLite files, a real second process holding the lock): reads and
filters, retention, and records lost (counted) rather than anything failing when the file cannot be written.
The records' numbers against a real llama-server are in test_activity.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from supervisor.telemetry import activity as act
from supervisor.telemetry.activity import Activity
from supervisor.telemetry.activity_record import Record, StreamTap
from supervisor.telemetry.activity_store import Filters
from supervisor.telemetry.answer import Captured, answer_numbers, capture_request, has_token, stream_text

ANSWER = (b'{"choices":[{"finish_reason":"length","message":{"role":"assistant","content":"hi there"}}],'
          b'"usage":{"completion_tokens":5,"prompt_tokens":9,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":2}},'
          b'"timings":{"cache_n":2,"prompt_n":7,"prompt_ms":1.5,"prompt_per_second":4666.7,"predicted_n":5,'
          b'"predicted_ms":2.0,"predicted_per_second":2500.0}}')


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[Activity]:
    a = Activity(tmp_path, registry=CollectorRegistry())
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


def add(a: Activity, model: str = "m", status: int = 200, duration_ms: float | None = None, **kw: Any) -> Record:
    rec = a.begin(model, "/v1/chat/completions", "POST", "127.0.0.1", **kw)
    assert rec is not None
    rec.status = status
    rec.answer = ANSWER if status < 400 else b'{"error":{"code":%d,"message":"nope","type":"x"}}' % status
    a.finish(rec)
    if duration_ms is not None:
        rec.duration_ms = duration_ms
    return rec


async def flushed(a: Activity, n: int, timeout: float = 10.0) -> None:
    """Until the file holds n rows."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await asyncio.to_thread(a.store.read_count) >= n:
                return
        except (sqlite3.Error, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the activity file did not reach {n} rows: {a.status()}")
        await asyncio.sleep(0.05)


async def test_numbers_and_filters(log: Activity) -> None:
    recs = [add(log, "a", 200, 50), add(log, "b", 503, 5), add(log, "a", 400, 900), add(log, "b", 200, 2000)]
    await flushed(log, 4)
    log.recent.clear()  # from here on only what the file holds
    rows = await log.list(Filters())
    assert [r["id"] for r in rows] == [r.id for r in reversed(recs)]  # newest first
    first = rows[-1]
    assert (first["prompt_tokens"], first["cached_tokens"], first["completion_tokens"]) == (9, 2, 5)
    assert (first["prompt_tps"], first["decode_tps"], first["finish_reason"]) == (4666.7, 2500.0, "length")
    assert first["at"].endswith("Z") and first["images"] == {"in": 0, "downscaled": 0}
    assert rows[2]["error"] == "nope" and rows[2]["prompt_tokens"] is None  # an error's text, no numbers
    assert [r["id"] for r in await log.list(Filters(model="a"))] == [recs[2].id, recs[0].id]
    assert [r["status"] for r in await log.list(Filters(status="5xx"))] == [503]
    assert [r["status"] for r in await log.list(Filters(status="error"))] == [400, 503]
    assert [r["status"] for r in await log.list(Filters(status="400"))] == [400]
    assert [r["id"] for r in await log.list(Filters(min_duration_ms=800))] == [recs[3].id, recs[2].id]
    assert [r["id"] for r in await log.list(Filters(before=recs[2].id, limit=1))] == [recs[1].id]
    stats = await log.stats(3600)
    assert stats["a"]["count"] == 2 and stats["a"]["errors"] == 1
    assert stats["b"]["decode_tps"] == {"p50": 2500.0, "p95": 2500.0, "p99": 2500.0}
    one = await log.get(recs[0].id)
    assert one is not None and one["capture"] is None and await log.get(10**9) is None


async def one_row(tmp_path: Path) -> int:
    """A log file with one record, closed; the record's id."""
    a = Activity(tmp_path)
    await a.start()
    rid = add(a).id
    await flushed(a, 1)
    await a.stop()
    return rid


async def test_ids_go_on_after_a_restart(tmp_path: Path) -> None:
    last = await one_row(tmp_path)
    b = Activity(tmp_path)
    await b.start()
    try:
        assert add(b).id == last + 1
        assert [r["id"] for r in await b.list(Filters())] == [last + 1, last]
    finally:
        await b.stop()


async def test_capture_keeps_media_as_hashes(tmp_path: Path) -> None:
    a = Activity(tmp_path, capture_max_kib=1)
    await a.start()
    try:
        body = json.dumps({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}]}]}).encode()
        rec = a.begin("m", "/v1/chat/completions", "POST", None, capture="all")
        assert rec is not None
        rec.status, rec.request_body, rec.answer = 200, body, ANSWER
        a.finish(rec)
        plain = add(a, capture="errors")  # a success under `errors`: nothing kept
        failed = add(a, status=400, capture="errors")
        await flushed(a, 3)
        doc = await a.get(rec.id)
        assert doc is not None and doc["captured"] and doc["capture"]["images_hashed"] == 1
        assert "sha256:" in doc["capture"]["request"] and "AAAA" not in doc["capture"]["request"]
        assert doc["capture"]["text"] == "hi there" and not doc["capture"]["truncated"]
        assert (await a.get(plain.id) or {})["capture"] is None
        assert "nope" in (await a.get(failed.id) or {})["capture"]["response"]
    finally:
        await a.stop()


def test_capture_truncates_and_streams_assemble() -> None:
    cap = Captured()
    capture_request(b'{"prompt":"' + b"x" * 3000 + b'"}', 1024, False, cap)
    assert cap.truncated and len(cap.request or "") == 1024
    sse = (b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}\n\n'
           b'data: {"choices":[{"delta":{"content":"he"}}]}\n\n'
           b'data: {"choices":[{"delta":{"content":"llo"}}]}\n\n'
           b'data: {"choices":[{"finish_reason":"stop","delta":{}}],"timings":{"prompt_n":3,"cache_n":0,'
           b'"predicted_n":2,"predicted_per_second":99.5}}\n\ndata: [DONE]\n\n')
    assert stream_text(sse)[0] == "hello"
    n = answer_numbers(sse, stream=True)
    assert n == {"prompt_tokens": 3, "cached_tokens": 0, "completion_tokens": 2, "decode_tps": 99.5,
                 "finish_reason": "stop"}
    assert not has_token(b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}')
    assert not has_token(b'data: {"choices":[{"delta":{"content":""}}]}')
    assert has_token(b'data: {"choices":[{"delta":{"content":"a"}}]}')


async def test_retention_by_rows_and_age(tmp_path: Path) -> None:
    clock = Clock()
    a = Activity(tmp_path, max_rows=100, days=1, clock=clock)
    await a.start()
    old = []
    clock.now -= 3 * 86400
    for _ in range(3):
        old.append(add(a, capture="all").id)
    clock.now += 3 * 86400
    fresh = [add(a).id for _ in range(150)]
    await flushed(a, 100)
    await a.stop()
    b = Activity(tmp_path, max_rows=100, days=1, clock=clock)  # retention runs at open, then every minute
    await b.start()
    try:
        rows = [r["id"] for r in await b.list(Filters(limit=1000))]
        assert rows == fresh[::-1][:100]
        assert not set(old) & set(rows)
        assert await asyncio.to_thread(lambda: sqlite3.connect(b.store.path).execute(
            "SELECT COUNT(*) FROM capture").fetchone()[0]) == 0  # the old rows' captures went with them
    finally:
        await b.stop()


@pytest.fixture
def locker(tmp_path: Path) -> Iterator[Any]:
    """Another process that holds the database's write lock until its stdin closes."""
    procs: list[subprocess.Popen[str]] = []

    def hold(path: Path) -> None:
        code = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\nsys.stdin.read()\n")
        p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"

    yield hold
    for p in procs:
        p.communicate(timeout=10)


async def test_a_locked_database_drops_records_and_recovers(tmp_path: Path, locker: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(act, "REOPEN_AFTER_S", 0.2)
    a = Activity(tmp_path, registry=CollectorRegistry())
    await a.start()
    try:
        add(a)
        await flushed(a, 1)
        locker(a.store.path)
        lost = add(a)
        deadline = time.monotonic() + 15
        while not a.dropped and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert a.dropped == {"write_error": 1} and a.status()["state"] == "error"
        assert "locked" in (a.status()["error"] or "")
        assert a.metrics.dropped.labels("write_error")._value.get() == 1
        assert any(r["id"] == lost.id for r in await a.list(Filters()))  # still shown from memory
    finally:
        await a.stop()


async def test_an_unwritable_database_at_start_loses_records_not_the_supervisor(tmp_path: Path) -> None:
    (tmp_path / act.DB_NAME).mkdir()  # a directory where the file should be: sqlite cannot open it
    a = Activity(tmp_path)
    await a.start()
    try:
        assert a.status()["state"] == "unavailable"
        rec = add(a)
        deadline = time.monotonic() + 10
        while not a.dropped and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert a.dropped == {"unavailable": 1}
        assert [r["id"] for r in await a.list(Filters())] == [rec.id]
    finally:
        await a.stop()


async def test_a_read_only_database_loses_records_not_requests(tmp_path: Path) -> None:
    kept = await one_row(tmp_path)
    db = tmp_path / act.DB_NAME
    # Immutable: refused even to root (tests run as root here, where file modes do not bind).
    if (await asyncio.to_thread(subprocess.run, ["chattr", "+i", str(db)], capture_output=True)).returncode:
        pytest.skip("chattr +i is not permitted here")
    try:
        b = Activity(tmp_path)
        await b.start()
        try:
            rec = add(b)
            deadline = time.monotonic() + 10
            while not b.dropped and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert b.status()["state"] in ("unavailable", "error") and sum(b.dropped.values()) == 1
            assert rec.id > kept and rec.id in [r["id"] for r in await b.list(Filters())]
        finally:
            await b.stop()
    finally:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", str(db)], check=True)


async def test_a_full_queue_drops_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = Activity(tmp_path)
    await a.start()
    try:
        monkeypatch.setattr(a, "_q", __import__("queue").Queue(2))
        a._q.put(object())  # the writer is not reading this new queue: it stays full after two
        a._q.put(object())
        add(a)
        assert a.dropped == {"queue_full": 1}
    finally:
        monkeypatch.undo()
        await a.stop()


async def test_off_records_nothing(tmp_path: Path) -> None:
    a = Activity(tmp_path, enabled=False)
    await a.start()
    assert a.begin("m", "/x", "POST", None) is None
    assert not (tmp_path / act.DB_NAME).exists() and a.status()["state"] == "off"
    await a.stop()


async def test_a_stream_tap_keeps_the_last_chunks_and_the_first_token_time(tmp_path: Path) -> None:
    a = Activity(tmp_path, capture_max_kib=1)
    await a.start()
    try:
        final = (b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"timings":{"cache_n":19,'
                 b'"prompt_n":1,"prompt_per_second":1941.7,"predicted_n":3,"predicted_ms":0.6,"predicted_per_second":3322.2}}'
                 b'\n\n')
        chunks = [b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]}\n\n',
                  b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"a"}}]}\n\n',
                  *[b'data: {"choices":[{"delta":{"content":"' + b"x" * 400 + b'"}}]}\n\n'] * 30,
                  final[:40], final[40:], b"data: [DONE]\n\n"]  # the last event cut in two, as TCP may
        for capture in ("off", "all"):
            rec = a.begin("m", "/v1/chat/completions", "POST", None, capture=capture)  # type: ignore[arg-type]
            assert rec is not None
            tap = StreamTap(rec)
            tap.feed(chunks[0], False)
            assert rec.ttft_ms is None  # the role-only first event is not a token
            tap.feed(chunks[1], False)
            assert rec.ttft_ms is not None
            for chunk in chunks[2:]:
                tap.feed(chunk, b'"timings"' in chunk)
            tap.done()
            assert rec.answer is not None and len(rec.answer) < 1000  # only the last chunks, not the stream
            rec.status = 200
            a.finish(rec)
            await flushed(a, 1 if capture == "off" else 2)
            doc = await a.get(rec.id)
            assert doc is not None
            assert (doc["prompt_tokens"], doc["cached_tokens"], doc["completion_tokens"]) == (20, 19, 3)
            assert (doc["decode_tps"], doc["finish_reason"], doc["stream"]) == (3322.2, "length", True)
            if capture == "all":  # raw chunks kept up to RAW_PER_TEXT times the limit, then the capture says cut
                assert doc["capture"]["truncated"] and doc["capture"]["text"].startswith("ax")
                assert a._pending == 0  # what was held for the writer is given back
    finally:
        await a.stop()
