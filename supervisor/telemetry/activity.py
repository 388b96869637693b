"""The activity log: one record per proxied request (timings, tokens, what the supervisor did to it), kept
in SQLite in the state directory, read by /activity, the ops page and the CLI; optionally with the request
and its answer captured for replay.

Nothing here may slow or fail a request. The proxy fills a Record with what it already knows (clocks it
reads anyway, references to bytes it already holds) and hands it over with one non-blocking put into a
bounded queue. A writer thread of its own does the rest in batches: llama-server's numbers parsed from the
answer (telemetry/answer.py), the histograms, the capture, the SQLite transaction, retention. A full queue,
a locked, read-only or full database: the record is dropped and counted
(llama_supervisor_activity_dropped_total), the page shows the state, the request never notices.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from . import answer
from .activity_record import Capture, Record
from .activity_store import Filters, Store, by_model, public

if TYPE_CHECKING:
    from ..spec.settings import Config

log = structlog.get_logger("activity")
NS = "llama_supervisor"
DB_NAME = "activity.sqlite3"
QUEUE_MAX = 4096  # records waiting for the writer; beyond, dropped (memory stays bounded)
BATCH_MAX = 256
FLUSH_S = 0.25  # a record is on disk within about this long
RECENT_MAX = 512  # the newest records, also kept in memory: readable before their batch lands, or with no disk
PENDING_BYTES_MAX = 64 << 20  # capture material (bodies, stream chunks) held for the writer at once, at most
PRUNE_EVERY_S = 60.0
REOPEN_AFTER_S = 5.0  # a failed database is opened again at most this often
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STOP = object()


class ActivityMetrics:
    """Histograms per model, observed on the writer thread (prometheus_client is thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ttft = Histogram(f"{NS}_time_to_first_token_seconds", "Time to the first byte of an answer (streams: "
                              "the first generated token)", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.decode = Histogram(f"{NS}_decode_tokens_per_second", "Generation speed llama-server reported per "
                                "request", ["model"], buckets=TPS_BUCKETS, registry=r)
        self.queue = Histogram(f"{NS}_request_queue_seconds", "Time a request waited for a ready llama-server or "
                               "a place at the upstream gate", ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.load = Histogram(f"{NS}_request_load_seconds", "Time a request waited for its model to load or swap "
                              "in (requests that waited)", ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.dropped = Counter(f"{NS}_activity_dropped_total", "Activity records lost (the request was served): "
                               "queue full, or the database could not be written", ["reason"], registry=r)
        self._per: dict[str, tuple[Any, ...]] = {}  # the histograms' children per model (labels() costs a lock)

    def observe(self, rec: Record) -> None:
        per = self._per.get(rec.model)
        if per is None:
            per = self._per[rec.model] = tuple(h.labels(rec.model) for h in (self.ttft, self.decode, self.queue,
                                                                                self.load))
        ttft, decode, waited, load = per
        if rec.ttft_ms is not None:
            ttft.observe(rec.ttft_ms / 1000)
        if rec.decode_tps is not None:
            decode.observe(rec.decode_tps)
        if rec.queue_ms or rec.ttft_ms is not None:  # it got as far as the wait (not a refusal before it)
            waited.observe(rec.queue_ms / 1000)
        if rec.load_ms:
            load.observe(rec.load_ms / 1000)


class Activity:
    """The log of one supervisor: `begin`/`finish` for the proxy, `list`/`get`/`stats` for readers."""

    def __init__(self, state_dir: Path, *, enabled: bool = True, max_rows: int = 100_000, days: float = 14.0,
                 capture_max_kib: int = 64, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.enabled = enabled
        self.store = Store(Path(state_dir) / DB_NAME, max_rows, days * 86400)
        self.capture_limit = capture_max_kib * 1024
        self.metrics = ActivityMetrics(registry if registry is not None else CollectorRegistry())
        self.clock = clock
        self.recent: deque[Record] = deque(maxlen=RECENT_MAX)
        self._q: queue.Queue[Any] = queue.Queue(QUEUE_MAX)
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.dropped: dict[str, int] = {}
        self.state, self.since = "off" if not enabled else "starting", clock()
        self.error: str | None = None
        self._opened_at = 0.0
        self._pruned_at = 0.0

    @classmethod
    def from_settings(cls, cfg: Config, registry: CollectorRegistry | None = None) -> Activity:
        return cls(cfg.state_dir, enabled=cfg.activity, max_rows=cfg.activity_max_rows, days=cfg.activity_days,
                   capture_max_kib=cfg.capture_max_kib, registry=registry)

    # ---- life ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled:
            return
        last = await asyncio.to_thread(self._open)
        # Ids go on from the file's highest; without a readable file, from the clock (in ms: above any count).
        self._ids = itertools.count(last + 1 if last is not None else int(self.clock() * 1000))
        self._thread = threading.Thread(target=self._run, name="activity-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Flush what is queued (a few seconds at most), then close."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        await asyncio.to_thread(self._stop_thread, thread)
        await asyncio.to_thread(self.store.close_reader)

    def _stop_thread(self, thread: threading.Thread) -> None:
        try:
            self._q.put(_STOP, timeout=5)
        except queue.Full:
            pass
        thread.join(timeout=10)

    # ---- the proxy's side (event loop; cheap) --------------------------------------------------------

    def begin(self, model: str, route: str, method: str, client: str | None, *, capture: Capture = "off",
              capture_media: bool = False, replay_of: int | None = None) -> Record | None:
        if self._thread is None:
            return None
        return Record(next(self._ids), self.clock(), model, route, method, client, replay_of, t0=time.perf_counter(),
                      capture=capture, capture_media=capture_media, owner=self)

    def keep_raw(self, rec: Record, size: int, per_limit: int | None = None) -> bool:
        """May this many more bytes of capture material be held for the writer? Bounded across requests
        (PENDING_BYTES_MAX) and, given per_limit, per request (that many times the capture limit)."""
        with self._pending_lock:
            over = per_limit is not None and rec.pending + size > per_limit * self.capture_limit
            if over or self._pending + size > PENDING_BYTES_MAX:
                return False
            self._pending += size
        rec.pending += size
        return True

    def finish(self, rec: Record) -> None:
        rec.duration_ms = (time.perf_counter() - rec.t0) * 1000
        if rec.capture == "off" or (rec.capture == "errors" and rec.status < 400 and rec.chunks_complete):
            self._release(rec)  # nothing of it is captured: the bodies need not wait for the writer
        self.recent.append(rec)
        try:
            self._q.put_nowait(rec)
        except queue.Full:
            rec.answer = None
            self._release(rec)
            self._drop("queue_full", 1)

    def _release(self, rec: Record) -> None:
        rec.request_body = rec.chunks = None
        rec.capture = "off"
        if rec.pending:
            with self._pending_lock:
                self._pending -= rec.pending
            rec.pending = 0

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.metrics.dropped.labels(reason).inc(n)

    # ---- the writer thread --------------------------------------------------------------------------

    def _open(self) -> int | None:
        self._opened_at = time.monotonic()
        try:
            last = self.store.open()
            self._prune()
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error or OSError: no log for now, requests go on
            self.store.close()
            self._set_state("unavailable", f"{self.store.path}: {exc}")
            log.warning("activity_unavailable", path=str(self.store.path), error=str(exc))
            return None
        self._set_state("ok", None)
        return last

    def _set_state(self, state: str, error: str | None) -> None:
        if (state, error) != (self.state, self.error):
            self.state, self.error, self.since = state, error, self.clock()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._q.get()
            if first is _STOP:
                break
            # Let a batch gather by sleeping, not by waking for every record: a wake-up per request (and the
            # GIL going back and forth with it) cost the proxy's process several times the record's own work.
            if self._q.qsize() < BATCH_MAX:
                time.sleep(FLUSH_S)
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)
        self.store.close()

    def _write(self, batch: list[Record]) -> None:
        rows, captures = [], []
        for i, rec in enumerate(batch):
            if i % 8 == 7:
                time.sleep(0)  # hand the GIL to the event loop now and then: it never waits for a whole batch
            try:
                cap = self._settle(rec)
            except Exception as exc:  # noqa: BLE001 - a bug in reading one answer must not stop the log
                log.error("activity_settle_error", id=rec.id, error=repr(exc))
                cap = None
            finally:
                rec.answer = None
                self._release(rec)
            rows.append(rec.row())
            if cap is not None:
                captures.append((rec.id, cap.request, cap.response, cap.text, int(cap.truncated), cap.images_hashed))
        if not self.store.is_open:
            if time.monotonic() - self._opened_at < REOPEN_AFTER_S or self._open() is None:
                self._drop("unavailable", len(rows))
                return
        try:
            self.store.write(rows, captures)
            if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                self._prune()
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error (locked, read-only, full, I/O) or OSError
            self._drop("write_error", len(rows))
            self._set_state("error", f"{self.store.path}: {exc}")
            log.warning("activity_write_failed", path=str(self.store.path), error=str(exc), dropped=len(rows))
            self.store.close()
            self._opened_at = time.monotonic()
            return
        self._set_state("ok", None)

    def _prune(self) -> None:
        self._pruned_at = time.monotonic()
        removed = self.store.prune(self.clock())
        if removed:
            log.debug("activity_pruned", rows=removed)

    def _settle(self, rec: Record) -> answer.Captured | None:
        """What the hot path left for later: llama-server's numbers, the error text, the histograms, the capture."""
        data = rec.answer
        if data is not None:
            if rec.status < 400:
                for k, v in answer.answer_numbers(data, rec.stream).items():
                    setattr(rec, k, v)
            elif rec.error is None:
                rec.error = answer.error_message(data)
        self.metrics.observe(rec)
        if rec.capture == "off" or (rec.capture == "errors" and rec.status < 400 and rec.chunks_complete):
            return None
        cap = answer.Captured()
        if rec.request_body is not None:
            answer.capture_request(rec.request_body, self.capture_limit, rec.capture_media, cap)
        if rec.chunks is not None:
            answer.capture_response(b"".join(rec.chunks), True, self.capture_limit, cap, rec.chunks_complete)
        elif data is not None:
            answer.capture_response(data, rec.stream, self.capture_limit, cap, True)
        rec.captured = True
        return cap

    # ---- reads (off the event loop) -----------------------------------------------------------------

    async def list(self, f: Filters) -> list[dict[str, Any]]:
        """Newest first: the file's rows, with the newest records not written yet (or not writable)."""
        mem = [r for r in self.recent if f.matches(r.id, r.model, r.status, r.duration_ms)]
        rows: list[dict[str, Any]] = []
        if self.enabled:
            try:
                rows = [public(r) for r in await asyncio.to_thread(self.store.read_list, f)]
            except Exception as exc:  # noqa: BLE001 - sqlite3.Error/OSError: the memory part is still worth showing
                log.debug("activity_read_failed", error=str(exc))
        seen = {r["id"] for r in rows}
        rows += [r.as_dict() for r in mem if r.id not in seen]
        rows.sort(key=lambda r: r["id"], reverse=True)
        return rows[:f.limit]

    async def get(self, rid: int) -> dict[str, Any] | None:
        """One record with its capture (under "capture", when kept)."""
        row, cap = None, None
        if self.enabled:
            try:
                row, cap = await asyncio.to_thread(self.store.read_one, rid)
            except Exception as exc:  # noqa: BLE001
                log.debug("activity_read_failed", error=str(exc))
        doc = public(row) if row else next((r.as_dict() for r in self.recent if r.id == rid), None)
        if doc is not None:
            doc["capture"] = ({k: (bool(v) if k == "truncated" else v) for k, v in cap.items() if k != "id"}
                              if cap else None)
        return doc

    async def stats(self, window_s: float) -> dict[str, Any]:
        """Per model over the window: count, errors, and p50/p95/p99 of TTFT and decode tokens/s."""
        since = self.clock() - window_s
        rows: list[tuple[str, int, float | None, float | None]] = []
        if self.enabled:
            try:
                rows = await asyncio.to_thread(self.store.read_window, since)
            except Exception as exc:  # noqa: BLE001
                log.debug("activity_read_failed", error=str(exc))
        if not rows:  # nothing on disk: what memory holds
            rows = [(r.model, r.status, r.ttft_ms, r.decode_tps) for r in self.recent if r.at >= since]
        return by_model(rows)

    def status(self) -> dict[str, Any]:
        """For the page and /status: is the log being written, and what was lost."""
        return {"enabled": self.enabled, "state": self.state, "error": self.error,
                "since": datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "path": str(self.store.path), "queued": self._q.qsize(), "dropped": dict(self.dropped),
                "max_rows": self.store.max_rows, "days": self.store.max_age_s / 86400}
