"""What /status shows: the runner's state in words and numbers, secrets redacted."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from typing import Any

import psutil

from .. import __version__
from ..child.runner import Runner
from ..child.view import RunnerView
from ..core.command import redact
from ..core.crash import signal_name
from ..host import gpu

LOG_TAIL = 40
_procs: dict[int, psutil.Process] = {}
# The process's own start (Unix time): the supervisor's uptime, not that of a runner (made anew on each load).
_STARTED = psutil.Process().create_time()


def supervisor_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "version": __version__, "uptime_s": round(time.time() - _STARTED, 3)}


def _iso(mono: float) -> str:
    """Monotonic time (used by the state machine) → wall clock, for people."""
    return datetime.fromtimestamp(time.time() - (time.monotonic() - mono), UTC).isoformat(timespec="milliseconds")


def process_sample(pid: int | None) -> dict[str, Any]:
    """Blocking (/proc reads): call through asyncio.to_thread. Keeps the psutil handle so CPU % has a baseline."""
    if pid is None:
        return {}
    proc = _procs.get(pid)
    try:
        if proc is None:
            _procs.clear()
            proc = _procs[pid] = psutil.Process(pid)
            proc.cpu_percent(None)
        return {"rss_bytes": proc.memory_info().rss, "cpu_percent": proc.cpu_percent(None)}
    except psutil.Error:
        return {}


def sample(runner: Runner | RunnerView) -> dict[str, Any]:
    """Blocking sample for metrics and status: child process and GPUs."""
    pid = runner.child_pid if isinstance(runner, RunnerView) else (runner.child.pid if runner.child else None)
    return {"child": process_sample(pid), "gpus": [g.as_dict() for g in gpu.snapshot()]}


async def build(runner: Runner, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """/status: the runner's snapshot, plus what others own (`extra`: requests, quarantine, last reload error)."""
    v = runner.view()
    m = v.machine
    s = await asyncio.to_thread(sample, v)
    p = v.loaded.profile
    last = None
    if m.last_exit is not None:
        rc = m.last_exit.returncode
        last = {"code": rc if rc is not None and rc >= 0 else None, "signal": signal_name(rc),
                "cause": m.last_exit.cause.value, "detail": m.last_exit.detail, "at": _iso(m.last_exit.at)}
    child_info = None
    if v.child_pid is not None and v.child_started_at is not None:
        vram = [p["memory_mib"] for g in s["gpus"] for p in g["processes"] if p["pid"] == v.child_pid]
        child_info = {"pid": v.child_pid, "uptime_s": round(time.time() - v.child_started_at, 3), "url": v.child_url,
                      "vram_mib": round(sum(vram), 1) if vram else None, **s["child"]}
    now = time.monotonic()
    return {
        "state": m.state.value,
        "since": _iso(m.since) if m.history else None,
        "reason": m.reason or None,
        "crash_loop": m.crash_loop,
        "next_attempt_in_s": round(max(0.0, m.retry_at - now), 1) if m.retry_at is not None else None,
        "profile": {"name": p.name, "file": str(v.loaded.path)},
        "argv": redact(list(v.argv)),
        "child": child_info,
        "loop": v.loop,
        "restarts": m.restarts,
        "last_exit": last,
        "load_s": None if v.load_s is None else round(v.load_s, 4),
        "warmup_s": None if not v.warmup or "seconds" not in v.warmup else v.warmup["seconds"],
        "warmup": v.warmup,
        "llama_server_version": v.loaded.caps.version,
        "binary": v.loaded.caps.binary,
        "settings": {"profile": m.base.as_dict(), "effective": m.effective.as_dict(), "adjustment": m.adjustment,
                     "model_layers": v.model_layers, "vram_estimate": v.vram_estimate, "climb": v.climb},
        "transitions": [{"at": _iso(t.at), "from": t.src.value, "to": t.dst.value, "cause": t.cause,
                         "detail": t.detail} for t in m.history],
        **(extra or {}),
        "gpus": s["gpus"],
        "gpu_unavailable": gpu.unavailable_reason() if not s["gpus"] else None,
        "log_tail": list(v.log_tail)[-LOG_TAIL:],
        "supervisor": supervisor_info(),
    }
