"""What the activity log costs a request: P1 and P2 against two supervisors on the same profile, one with
the log on (the default: a record per request, written to SQLite by its own thread) and one with it off
(`activity: false`), interleaved request by request (P1) and round by round (P2) so machine noise hits both.

bench.py's P1/P2 functions compare a "through" side with a "direct" one: here "through" is the log on and
"direct" the log off, so their differences are the log's cost. Used by scripts/bench.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil


async def on_and_off(supervisor: Callable[..., Any], profile: Path, tmp: Path, quick: bool,
                     p1: Callable[[str, str, int], Awaitable[dict[str, Any]]],
                     p2: Callable[[str, str, int], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    t0 = time.time()
    on = supervisor(profile, tmp / "state-activity-on")
    off = supervisor(profile, tmp / "state-activity-off", {"LLAMA_SUPERVISOR_ACTIVITY": "false"})
    try:
        on.wait_state("ready", t0)
        off.wait_state("ready", t0)
        procs = {"on": psutil.Process(on.proc.pid), "off": psutil.Process(off.proc.pid)}
        out: dict[str, Any] = {}
        for name, run, count in (("p1_latency", p1, 200 if quick else 600), ("p2_streaming", p2, 2 if quick else 6)):
            before = {k: _cpu(p) for k, p in procs.items()}
            out[name] = await run(on.url, off.url, count)
            # CPU time is what the log adds, whatever else loads the machine (latency on a busy box is noise):
            # the supervisor's own process, its writer thread included, per request of the run.
            requests = count + 20 if name == "p1_latency" else (count + 1) * 16
            out[name]["cpu_us_per_request"] = {k: round((_cpu(p) - before[k]) / requests * 1e6, 1)
                                               for k, p in procs.items()}
        await asyncio.sleep(1.0)  # the last batch reaches the disk
        async with httpx.AsyncClient(timeout=10) as c:
            log = (await c.get(f"{on.url}/activity", params={"limit": 1})).json()
        out["records"] = log["requests"][0]["id"] if log["requests"] else 0
        out["dropped"] = log["log"]["dropped"]
        return out
    finally:
        on.stop()
        off.stop()


def _cpu(p: Any) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    p1, p2 = r["p1_latency"], r["p2_streaming"]
    c1, c2 = p1["cpu_us_per_request"], p2["cpu_us_per_request"]
    return [
        ("activity log on vs off: supervisor CPU per request, P1 / P2", f"{c1['off']} / {c2['off']} µs (off)",
         f"{c1['on']} / {c2['on']} µs (on)", f"{c1['on'] - c1['off']:+.1f} / {c2['on'] - c2['off']:+.1f} µs", ""),
        ("activity log on vs off: P1 p50 / p99", f"{p1['direct']['p50_ms']} / {p1['direct']['p99_ms']} ms (off)",
         f"{p1['through']['p50_ms']} / {p1['through']['p99_ms']} ms (on)",
         f"{p1['added_p50_ms']:+} / {p1['added_p99_ms']:+} ms", "no measurable cost"),
        ("activity log on vs off: P2 throughput / TTFT p50", f"{p2['direct']['tokens_per_s']} tok/s / "
         f"{p2['direct']['ttft_p50_ms']} ms (off)", f"{p2['through']['tokens_per_s']} tok/s / "
         f"{p2['through']['ttft_p50_ms']} ms (on; {r['records']} records, dropped {r['dropped'] or 'none'})",
         f"{p2['ratio'] * 100:.1f} % / {p2['added_ttft_p50_ms']:+} ms", "no measurable cost"),
    ]
