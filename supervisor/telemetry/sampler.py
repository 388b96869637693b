"""The sampler behind the page's charts: every few seconds, one row per time into two bounded rings.

Cheap by design (the idle target is ≤ 0.5 % CPU): on the event loop it only reads the Prometheus
counters the proxy already keeps (so the page and /metrics show the same numbers); /proc and NVML are
read in one worker-thread call per sample. Rates and latency percentiles are computed from the
counters' differences between two samples.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import structlog

from ..host import gpu
from .metrics import Metrics
from .series import SeriesRing

log = structlog.get_logger("telemetry")
MB = 1e6


@dataclass(frozen=True)
class Source:
    """One model as the sampler sees it (one today; several once multi-model support lands)."""

    model: str
    metrics: Metrics
    child_pid: int | None


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus-style estimate from cumulative bucket counts [(upper bound, count)], sorted, +Inf last:
    linear within the bucket the rank falls in; a rank in +Inf answers the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return le if c == prev_c else prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def _samples(metric: Any) -> Iterable[Any]:
    for fam in metric.collect():
        yield from fam.samples


def read_counters(m: Metrics) -> dict[str, Any]:
    """Cumulative values of what the charts need (microseconds of work: a few label sets each)."""
    out: dict[str, Any] = {"tokens": {}, "status": {}, "lat": {}, "qwait": [0.0, 0.0]}
    for s in _samples(m.tokens):
        if s.name.endswith("_total"):
            out["tokens"][s.labels["kind"]] = s.value
    for s in _samples(m.requests):
        if s.name.endswith("_total"):
            cls = s.labels["status"][:1] + "xx"
            out["status"][cls] = out["status"].get(cls, 0.0) + s.value
    for s in _samples(m.latency):
        if s.name.endswith("_bucket"):
            le = float(s.labels["le"])
            out["lat"][le] = out["lat"].get(le, 0.0) + s.value
    for s in _samples(m.queue_wait):
        if s.name.endswith("_sum"):
            out["qwait"][0] += s.value
        elif s.name.endswith("_count"):
            out["qwait"][1] += s.value
    out["queued"] = sum(s.value for s in _samples(m.queued))
    # The last answered probe of the inference loop (child/liveness.py); None before the first answer.
    alive = sum(s.value for s in _samples(m.loop_probes) if s.name.endswith("_total") and s.labels["outcome"] == "alive")
    out["loop_s"] = sum(s.value for s in _samples(m.loop_latency)) if alive else None
    out["in_flight"] = sum(s.value for s in _samples(m.in_flight))
    return out


def rates(model: str, prev: dict[str, Any] | None, cur: dict[str, Any], dt: float) -> dict[str, float | None]:
    """One model's row: per-second rates and interval percentiles from two counter readings."""
    sfx = f"@{model}"
    row: dict[str, float | None] = {f"queued{sfx}": cur["queued"], f"in_flight{sfx}": cur["in_flight"],
                                    f"loop_ms{sfx}": None if cur["loop_s"] is None else cur["loop_s"] * 1000}
    if prev is None or dt <= 0:
        return row

    def per_s(a: float, b: float) -> float | None:
        return (b - a) / dt if b >= a else None  # a counter that went back was reset: no rate this time

    for kind in ("prompt", "completion"):
        row[f"{kind}_tps{sfx}"] = per_s(prev["tokens"].get(kind, 0.0), cur["tokens"].get(kind, 0.0))
    for cls in ("2xx", "4xx", "5xx"):
        row[f"rps_{cls}{sfx}"] = per_s(prev["status"].get(cls, 0.0), cur["status"].get(cls, 0.0))
    delta = sorted((le, c - prev["lat"].get(le, 0.0)) for le, c in cur["lat"].items())
    for q in (50, 90, 99):
        v = quantile(q / 100, delta)
        row[f"lat_p{q}{sfx}"] = None if v is None else v * 1000  # ms
    waited = cur["qwait"][1] - prev["qwait"][1]
    row[f"queue_wait_ms{sfx}"] = (cur["qwait"][0] - prev["qwait"][0]) / waited * 1000 if waited > 0 else None
    return row


class _ProcWatch:
    """RSS and CPU % of one process over the interval between two samples (its own baseline)."""

    def __init__(self) -> None:
        self.proc: psutil.Process | None = None
        self.last: tuple[float, float] | None = None

    def sample(self, pid: int | None) -> tuple[float | None, float | None]:
        if pid is None:
            self.proc, self.last = None, None
            return None, None
        try:
            if self.proc is None or self.proc.pid != pid:
                self.proc, self.last = psutil.Process(pid), None
            with self.proc.oneshot():
                rss = self.proc.memory_info().rss
                ct = self.proc.cpu_times()
        except psutil.Error:
            self.proc, self.last = None, None
            return None, None
        now, cpu = time.monotonic(), ct.user + ct.system
        pct = None if self.last is None else 100 * (cpu - self.last[1]) / max(1e-6, now - self.last[0])
        self.last = (now, cpu)
        return rss / MB, pct


class Sampler:
    """Fine ring: `interval_s` rows for `fine_s`; coarse ring: one row a minute (a summary of the fine rows)."""

    def __init__(self, sources: Callable[[], list[Source]], interval_s: float = 2.0, fine_s: float = 3600,
                 coarse_s: float = 86400, coarse_every_s: float = 60.0) -> None:
        self.sources = sources
        self.interval_s = interval_s
        self.fine = SeriesRing(max(1, int(fine_s / interval_s)))
        self.coarse_every = max(1, int(coarse_every_s / interval_s))
        self.coarse = SeriesRing(max(1, int(coarse_s / coarse_every_s)))
        self._prev: dict[str, tuple[float, dict[str, Any]]] = {}
        self._me = _ProcWatch()
        self._children: dict[str, _ProcWatch] = {}
        self._n = 0

    def _slow(self, pids: dict[str, int | None]) -> dict[str, float | None]:
        """Blocking: /proc and NVML, in a worker thread."""
        row: dict[str, float | None] = {}
        row["sup_rss_mb"], row["sup_cpu"] = self._me.sample(os.getpid())
        for model, pid in pids.items():
            watch = self._children.setdefault(model, _ProcWatch())
            row[f"child_rss_mb@{model}"], row[f"child_cpu@{model}"] = watch.sample(pid)
        for name in [m for m in self._children if m not in pids]:
            del self._children[name]
        for g in gpu.snapshot():
            row[f"gpu_mem_mb@{g.index}"] = g.memory_used_mib * 2**20 / MB
            row[f"gpu_util@{g.index}"] = g.utilization_pct
        return row

    async def sample_once(self) -> None:
        sources = self.sources()
        # The row's time is when the counters were read (the rates' interval ends there), not after the thread.
        now_m, t, row = time.monotonic(), round(time.time(), 3), {}
        for src in sources:
            cur = read_counters(src.metrics)
            prev = self._prev.get(src.model)
            row.update(rates(src.model, prev[1] if prev else None, cur, now_m - prev[0] if prev else 0.0))
            self._prev[src.model] = (now_m, cur)
        row.update(await asyncio.to_thread(self._slow, {s.model: s.child_pid for s in sources}))
        self.fine.append(t, row)  # t is rounded as exported: a client's `since` then matches exactly
        self._n += 1
        if self._n % self.coarse_every == 0:
            self.coarse.append(t, self.fine.summary_of_last(self.coarse_every))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample_once()
            except Exception as exc:  # noqa: BLE001 - a failed sample must not end the charts
                log.warning("sample_failed", error=repr(exc))
            next_at = max(next_at + self.interval_s, loop.time())  # no burst of catch-up samples after a stall
            await asyncio.sleep(next_at - loop.time())

    def export(self, window_s: float, since: float = 0.0) -> dict[str, Any]:
        """Rows of the last `window_s` seconds newer than `since`; the fine ring when it covers the window."""
        fine = window_s <= self.fine.capacity * self.interval_s
        ring = self.fine if fine else self.coarse
        start = max(since, time.time() - window_s)
        out = ring.export(ring.rows_after(start))
        out["interval_s"] = self.interval_s if fine else self.interval_s * self.coarse_every
        out["window_s"] = window_s
        return out

    def nbytes(self) -> int:
        return self.fine.nbytes() + self.coarse.nbytes()
