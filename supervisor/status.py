"""What /status shows: the runner's state in words and numbers, secrets redacted."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from typing import Any

import psutil

from . import __version__
from .child.runner import Runner
from .core.command import redact
from .core.crash import signal_name
from .host import gpu

LOG_TAIL = 40
_procs: dict[int, psutil.Process] = {}


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


def sample(runner: Runner) -> dict[str, Any]:
    """Blocking sample for metrics and status: child process and GPUs."""
    child = runner.child
    return {"child": process_sample(child.pid if child else None), "gpus": [g.as_dict() for g in gpu.snapshot()]}


async def build(runner: Runner) -> dict[str, Any]:
    m = runner.machine
    child = runner.child
    s = await asyncio.to_thread(sample, runner)
    p = runner.loaded.profile
    last = None
    if m.last_exit is not None:
        rc = m.last_exit.returncode
        last = {"code": rc if rc is not None and rc >= 0 else None, "signal": signal_name(rc),
                "cause": m.last_exit.cause.value, "detail": m.last_exit.detail, "at": _iso(m.last_exit.at)}
    child_info = None
    if child is not None:
        vram = [p["memory_mib"] for g in s["gpus"] for p in g["processes"] if p["pid"] == child.pid]
        child_info = {"pid": child.pid, "uptime_s": round(time.time() - child.started_at, 3), "url": runner.child_url,
                      "vram_mib": round(sum(vram), 1) if vram else None, **s["child"]}
    return {
        "state": m.state.value,
        "since": _iso(m.since) if m.history else None,
        "reason": m.reason or None,
        "profile": {"name": p.name, "file": str(runner.loaded.path)},
        "argv": redact(runner.argv),
        "child": child_info,
        "restarts": m.restarts,
        "last_exit": last,
        "load_s": None if runner.load_s is None else round(runner.load_s, 4),
        "warmup_s": None if not runner.warmup or "seconds" not in runner.warmup else runner.warmup["seconds"],
        "warmup": runner.warmup,
        "llama_server_version": runner.loaded.caps.version,
        "binary": runner.loaded.caps.binary,
        "settings": {"profile": m.base.as_dict(), "effective": m.effective.as_dict(), "adjustment": m.adjustment,
                     "model_layers": runner.model_layers, "vram_estimate": runner.last_estimate},
        "transitions": [{"at": _iso(t.at), "from": t.src.value, "to": t.dst.value, "cause": t.cause,
                         "detail": t.detail} for t in m.history],
        "requests": {"in_flight": runner.in_flight, "waiting": runner.waiting},
        "last_reload_error": runner.last_reload_error,
        "gpus": s["gpus"],
        "gpu_unavailable": gpu.unavailable_reason() if not s["gpus"] else None,
        "log_tail": (list(child.tail) if child else runner.last_tail)[-LOG_TAIL:],
        "supervisor": {"pid": os.getpid(), "version": __version__,
                       "uptime_s": round(time.monotonic() - runner.started_mono, 3)},
    }
