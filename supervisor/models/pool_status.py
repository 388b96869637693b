"""What /status, /health and /v1/models say about a box with several models."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from ..child.runner import Runner
from ..core.agent import Load
from ..core.lifecycle import State
from ..core.residency import Mem
from ..spec.loaded import base_settings
from .model import Slot
from .pool import Pool


def _mem(m: Mem | None) -> dict[str, Any] | None:
    return None if m is None else asdict(m)


def _ago(mono: float) -> float | None:
    return round(time.monotonic() - mono, 1) if mono else None


def modalities(slot: Slot) -> list[str]:
    return ["text", "image"] if slot.loaded.profile.mmproj is not None else ["text"]


def model_state(slot: Slot) -> str:
    """loaded, loading, unloaded or failed (what clients see in /v1/models); draining counts as loaded."""
    seen = slot.seen().value
    return "loaded" if seen == "draining" else seen


def section(pool: Pool, slot: Slot) -> dict[str, Any]:
    p = slot.loaded.profile
    r = slot.runner
    m = r.machine if r is not None else None
    last = None
    if m is not None and m.last_exit is not None:
        last = {"cause": m.last_exit.cause.value, "detail": m.last_exit.detail, "code": m.last_exit.returncode}
    return {
        "state": model_state(slot), "lifecycle": m.state.value if m else None, "reason": (m.reason or None) if m else None,
        "default": slot.id == pool.default, "file": str(slot.loaded.path), "aliases": list(p.aliases),
        "modalities": modalities(slot),
        "settings": {"pinned": p.pinned, "ttl_s": p.ttl_s, "preload": p.preload, "n_gpu_layers": p.n_gpu_layers,
                     "ctx_size": p.ctx_size, "effective": m.effective.as_dict() if m else None,
                     "adjustment": m.adjustment if m else None},
        "restarts": m.restarts if m else 0, "last_exit": last,
        "memory": {"estimate": _mem(slot.estimate), "measured": _mem(slot.measured)},
        "last_used_s_ago": _ago(slot.last_used),
        "requests": {"in_flight": slot.in_flight, "waiting": slot.waiting},
        "waiting_for": slot.waiting_why or None, "draining": slot.draining or None,
        "loads": slot.loads, "last_unload": slot.last_unload,
        "child": {"pid": r.child.pid, "url": r.child_url} if r is not None and r.child is not None else None,
    }


def unloaded(slot: Slot) -> dict[str, Any]:
    """A model with no runner, in /status's shape (the ops page's card): its profile's settings, why it is out."""
    last = slot.last_unload
    why = (f"unloaded ({last['reason']})" + (f": {last['detail']}" if last.get("detail") else "") if last
           else ("waiting to load: " + slot.waiting_why if slot.waiting_why else "not loaded yet"))
    return {"state": "unloaded", "reason": why,
            "since": datetime.fromtimestamp(last["at"], UTC).isoformat(timespec="milliseconds") if last else None,
            "profile": {"name": slot.id, "file": str(slot.loaded.path)}, "child": None, "restarts": 0,
            "last_exit": None, "load_s": None, "warmup_s": None,
            "settings": {"profile": base_settings(slot.loaded.profile).as_dict(), "effective": None,
                         "adjustment": None},
            "requests": {"in_flight": slot.in_flight, "waiting": slot.waiting}}


def residency(pool: Pool) -> dict[str, Any]:
    r = pool.last_room
    held = {s.id: _mem(s.measured or s.estimate) for s in pool.slots.values() if s.runner is not None}
    return {
        "memory_budget_mib": pool.cfg.memory_budget_mib,
        "host_used_mib": round(sum(m["host_mib"] for m in held.values() if m), 1),
        "gpu_free_mib": list(r.gpu_free_mib) if r else None,
        "host_available_mib": round(r.host_available_mib, 1) if r and r.host_available_mib is not None else None,
        "held": held, "swap_pass_over_s": pool.rules.pass_over_s,
    }


async def build(pool: Pool, status_of: Callable[[Runner], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """The default model's full status at the top (as with one model: `llama-supervisor status` reads it),
    then every model's section and the residency picture."""
    default = pool.slots[pool.default]
    top: dict[str, Any] = (await status_of(default.runner) if default.runner is not None
                           else {"state": "unloaded", "profile": {"name": default.id, "file": str(default.loaded.path)}})
    top.update(default_model=pool.default, models={s.id: section(pool, s) for s in pool.slots.values()},
               residency=residency(pool), profile_errors=pool.errors or None)
    return top


def health(pool: Pool, model: str | None) -> tuple[int, dict[str, Any]]:
    """One model's readiness, or the box's: the default and every pinned model ready."""
    if model is not None:
        slots = [pool.slots[model]]
    else:
        slots = [s for s in pool.slots.values() if s.id == pool.default or s.loaded.profile.pinned]
    not_ready = {s.id: (s.runner.machine.state.value if s.runner else "unloaded") for s in slots
                 if s.runner is None or s.runner.machine.state is not State.READY}
    if not not_ready:
        return 200, {"status": "ok", "models": {s.id: "ready" for s in slots}}
    reason = "; ".join(f"'{k}' is {v}" for k, v in not_ready.items())
    first = next(iter(not_ready.values()))
    return 503, {"status": first, "reason": reason, "models": not_ready}


def agent_load(pool: Pool, draining: str | None) -> Load:
    """What HAProxy's agent hears from a box with several models, consistent with /health: ready (weighted by
    the free share of every loaded model's slots) when the default and every pinned model are ready, else the
    first of those that is not (None: unloaded)."""
    code, doc = health(pool, None)
    state: State | None = State.READY
    if code != 200:
        first = next(iter(doc["models"]))
        runner = pool.slots[first].runner
        state = runner.machine.state if runner is not None else None
    # The profiles' `parallel` (not asked of each child): unknown when any serving profile leaves it to llama-server.
    slots = [s.loaded.profile.parallel for s in pool.slots.values()
             if s.runner is not None and s.runner.machine.state is State.READY]
    total = None if not slots or None in slots else sum(p or 0 for p in slots)
    return Load(state, draining, total, pool.in_flight())


def models_list(pool: Pool) -> dict[str, Any]:
    """OpenAI's list shape; `state`, `modalities` and `aliases` are ours."""
    data = []
    for s in pool.slots.values():
        data.append({"id": s.id, "object": "model", "created": s.created, "owned_by": "llama-supervisor",
                     "state": model_state(s), "modalities": modalities(s), "aliases": list(s.loaded.profile.aliases),
                     "default": s.id == pool.default, "pinned": s.loaded.profile.pinned})
    out: dict[str, Any] = {"object": "list", "data": data}
    if pool.errors:
        out["profile_errors"] = list(pool.errors.values())
    return out
