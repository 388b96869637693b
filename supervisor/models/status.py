"""What /status, /health, /v1/models and HAProxy's agent say about the box: every model, one shape, whether the
box offers one model or several. Secrets are redacted."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import psutil

from .. import __version__
from ..core.agent import Load
from ..core.command import redact
from ..core.crash import signal_name
from ..core.lifecycle import State
from ..core.residency import Mem
from ..host import gpu, procs
from .gpus import child_pids, holders
from .model import Model
from .pool import Pool

LOG_TAIL = 40
# The process's own start (Unix time): the supervisor's uptime, not that of a child.
_STARTED = psutil.Process().create_time()


def supervisor_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "version": __version__, "uptime_s": round(time.time() - _STARTED, 3)}


def _iso(mono: float) -> str:
    """Monotonic time (used by the state machine) → wall clock, for people."""
    return datetime.fromtimestamp(time.time() - (time.monotonic() - mono), UTC).isoformat(timespec="milliseconds")


def _mem(m: Mem | None) -> dict[str, Any] | None:
    return None if m is None else asdict(m)


def sample(pool: Pool) -> dict[str, Any]:
    """Blocking (/proc, NVML): every child's RSS and CPU, and the GPUs. For metrics and the page."""
    pids = {m.id: m.runner.child.pid for m in list(pool.models.values()) if m.runner.child is not None}
    procs.forget_except(pids.values())
    return {"children": {mid: procs.sample(pid) for mid, pid in pids.items()},
            "gpus": holders({pid: mid for mid, pid in pids.items()}, [g.as_dict() for g in gpu.snapshot()])}


def modalities(model: Model) -> list[str]:
    return ["text", "image"] if model.loaded.profile.mmproj is not None else ["text"]


async def model_doc(model: Model, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's status: its runner's snapshot (loaded or not: the runner outlives its children), plus what
    others own (`extra`: requests, quarantine, context)."""
    v = model.runner.view()
    m = v.machine
    child_sample, gpus = await asyncio.to_thread(lambda: (procs.sample(v.child_pid),
                                                          [g.as_dict() for g in gpu.snapshot()]))
    p = v.loaded.profile
    last = None
    if m.last_exit is not None:
        rc = m.last_exit.returncode
        last = {"code": rc if rc is not None and rc >= 0 else None, "signal": signal_name(rc),
                "cause": m.last_exit.cause.value, "detail": m.last_exit.detail, "at": _iso(m.last_exit.at)}
    child_info = None
    if v.child_pid is not None and v.child_started_at is not None:
        vram = [p["memory_mib"] for g in gpus for p in g["processes"] if p["pid"] == v.child_pid]
        child_info = {"pid": v.child_pid, "uptime_s": round(time.time() - v.child_started_at, 3), "url": v.child_url,
                      "vram_mib": round(sum(vram), 1) if vram else None, **child_sample}
    state, reason, since = m.state.value, m.reason or None, _iso(m.since) if m.history else None
    if not model.resident:  # unloaded: say why, not the stopped child's last words
        last_unload = model.last_unload
        state, reason = "unloaded", (
            f"unloaded ({last_unload['reason']})" + (f": {last_unload['detail']}" if last_unload.get("detail") else "")
            if last_unload else ("waiting to load: " + model.waiting_why if model.waiting_why else "not loaded yet"))
        since = (datetime.fromtimestamp(last_unload["at"], UTC).isoformat(timespec="milliseconds")
                 if last_unload else None)
    now = time.monotonic()
    extra = dict(extra or {})
    requests = {"in_flight": model.in_flight, "waiting": model.waiting}
    if "upstream" in extra:
        requests["upstream"] = extra.pop("upstream")
    return {
        "state": state,
        "since": since,
        "reason": reason,
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
        "settings": {"profile": m.base.as_dict(), "effective": m.effective.as_dict() if model.resident else None,
                     "adjustment": m.adjustment if model.resident else None,
                     "model_layers": v.model_layers, "vram_estimate": v.vram_estimate, "climb": v.climb},
        "transitions": [{"at": _iso(t.at), "from": t.src.value, "to": t.dst.value, "cause": t.cause,
                         "detail": t.detail} for t in m.history],
        "requests": requests,
        **extra,
        "gpus": gpus,
        "gpu_unavailable": gpu.unavailable_reason() if not gpus else None,
        "log_tail": list(v.log_tail)[-LOG_TAIL:],
        "supervisor": supervisor_info(),
    }


def section(pool: Pool, model: Model) -> dict[str, Any]:
    """A model's residency: what /status lists under `models` and the page's card shows."""
    p = model.loaded.profile
    m = model.runner.machine
    last = None
    if m.last_exit is not None:
        last = {"cause": m.last_exit.cause.value, "detail": m.last_exit.detail, "code": m.last_exit.returncode}
    child = model.runner.child
    return {
        "state": model.state_word(), "lifecycle": m.state.value if model.resident else None,
        "reason": (m.reason or None) if model.resident else None,
        "default": model.id == pool.default, "file": str(model.loaded.path), "aliases": list(p.aliases),
        "modalities": modalities(model),
        "settings": {"pinned": p.pinned, "ttl_s": p.ttl_s, "preload": p.preload, "n_gpu_layers": p.n_gpu_layers,
                     "ctx_size": p.ctx_size, "effective": m.effective.as_dict() if model.resident else None,
                     "adjustment": m.adjustment if model.resident else None},
        "restarts": m.restarts, "last_exit": last,
        "memory": {"estimate": _mem(model.estimate), "measured": _mem(model.measured)},
        "last_used_s_ago": round(time.monotonic() - model.last_used, 1) if model.last_used else None,
        "requests": {"in_flight": model.in_flight, "waiting": model.waiting},
        "waiting_for": model.waiting_why or None, "draining": model.draining or None,
        "loads": model.loads, "last_unload": model.last_unload,
        "child": {"pid": child.pid, "url": model.runner.child_url} if child is not None else None,
    }


def residency(pool: Pool) -> dict[str, Any]:
    r = pool.last_room
    held = {m.id: _mem(m.measured or m.estimate) for m in pool.models.values() if m.resident}
    return {
        "memory_budget_mib": pool.cfg.memory_budget_mib,
        "host_used_mib": round(sum(m["host_mib"] for m in held.values() if m), 1),
        "gpu_free_mib": list(r.gpu_free_mib) if r else None,
        "host_available_mib": round(r.host_available_mib, 1) if r and r.host_available_mib is not None else None,
        "held": held, "swap_pass_over_s": pool.rules.pass_over_s,
    }


def box(pool: Pool, default_doc: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """/status: the default model's full status at the top (`llama-supervisor status` reads it), then every
    model's section, the residency picture and what the box owns (`extra`: draining, reload errors)."""
    default_doc.update(default_model=pool.default, models={m.id: section(pool, m) for m in pool.models.values()},
                       residency=residency(pool), profile_errors=pool.errors or None, **extra)
    # Each GPU with what each model's child holds there (the snapshot the default's doc already read).
    default_doc["gpus"] = holders(child_pids(pool.models.values()), default_doc.get("gpus") or [])
    return default_doc


def health(pool: Pool, model: str | None) -> tuple[int, dict[str, Any]]:
    """One model's readiness, or the box's: the default and every pinned model ready."""
    if model is not None:
        models = [pool.models[model]]
    else:
        models = [m for m in pool.models.values() if m.id == pool.default or m.loaded.profile.pinned]
    not_ready = {m.id: _health_word(m) for m in models if not m.resident or m.runner.machine.state is not State.READY}
    if not not_ready:
        return 200, {"status": "ok", "models": {m.id: "ready" for m in models}}
    first_id, first = next(iter(not_ready.items()))
    reason = "; ".join(f"'{k}' is {v}" for k, v in not_ready.items())
    runner = pool.models[first_id].runner
    if len(pool.models) == 1 and pool.models[first_id].resident and runner.machine.reason:
        reason = runner.machine.reason  # one model: why its child is not ready (a crash loop, a load)
    return 503, {"status": first, "reason": reason, "models": not_ready}


def _health_word(m: Model) -> str:
    """Its lifecycle state; not loaded: `starting` when a load is wanted (the default at start, between the
    server listening and the pool's first step), else `unloaded`."""
    if m.resident:
        return m.runner.machine.state.value
    return State.STARTING.value if m.wanted_since is not None or m.waiting else "unloaded"


def agent_load(pool: Pool, draining: str | None) -> Load:
    """What HAProxy's agent hears, consistent with /health: ready (weighted by the free share of every serving
    model's slots) when the default and every pinned model are ready, else the first of those that is not
    (None: unloaded)."""
    code, doc = health(pool, None)
    state: State | None = State.READY
    if code != 200:
        first = pool.models[next(iter(doc["models"]))]
        word = _health_word(first)
        state = first.runner.machine.state if first.resident else State.STARTING if word == "starting" else None
    # llama-server's own slot counts (asked once per child), else the profiles' `parallel`: unknown when any
    # serving model has neither.
    slots = [m.profile_slots for m in pool.models.values() if m.resident and m.runner.ready]
    total = None if not slots or None in slots else sum(s or 0 for s in slots)
    return Load(state, draining, total, pool.in_flight())


def models_list(pool: Pool) -> dict[str, Any]:
    """OpenAI's list shape; `state`, `modalities` and `aliases` are ours."""
    data = []
    for m in pool.models.values():
        data.append({"id": m.id, "object": "model", "created": m.created, "owned_by": "llama-supervisor",
                     "state": m.state_word(), "modalities": modalities(m), "aliases": list(m.loaded.profile.aliases),
                     "default": m.id == pool.default, "pinned": m.loaded.profile.pinned})
    out: dict[str, Any] = {"object": "list", "data": data}
    if pool.errors:
        out["profile_errors"] = list(pool.errors.values())
    return out
