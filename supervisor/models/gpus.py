"""The box's GPUs as the operator sees them (which models hold how much on each), and what loading a model now
would do (GET /plan): the same pure decisions residency and the runner take (core/residency.py `preview`,
core/placement.py), asked without doing anything."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from ..core import residency as rs
from ..core.ladder import RunSettings, placed
from ..host import room
from ..spec.loaded import base_settings
from .model import Model
from .pool import Pool


def child_pids(models: Iterable[Model]) -> dict[int, str]:
    return {m.runner.child.pid: m.id for m in models if m.runner.child is not None}


def holders(pids: Mapping[int, str], gpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each GPU (host/gpu.py's dicts) with the MiB each model's child (`pids`: pid → model) holds there (NVML's
    per-process figure) and what other processes hold."""
    out = []
    for g in gpus:
        held: dict[str, float] = {}
        for p in g.get("processes", []):
            if p["pid"] in pids:
                held[pids[p["pid"]]] = round(held.get(pids[p["pid"]], 0.0) + p["memory_mib"], 1)
        out.append({**g, "models": held,
                    "others_mib": round(max(0.0, g["memory_used_mib"] - sum(held.values())), 1)})
    return out


def _first(model: Model, plan: rs.Plan | None, learned: RunSettings | None, estimate: bool) -> tuple[RunSettings, str]:
    """The settings the start would begin with, and where they come from: child/vram.py `first_settings`'s rules."""
    raw = base_settings(model.loaded.profile)
    base = placed(raw, plan, cut=False) if plan is not None else raw
    if learned is not None and not (base.placement is not None and replace(learned, placement=None) == raw):
        return learned, "learned: the last settings that reached ready (a climb check at start may raise them)"
    if plan is not None and estimate and plan.kind == "partial":
        return placed(raw, plan, cut=True), "the profile's, with the layers that fit (estimate_vram)"
    return base, "the profile's"


async def plan(pool: Pool, model: Model) -> dict[str, Any]:
    """GET /plan: what loading `model` now would do. No side effect: memory is read, nothing is decided for real."""
    doc: dict[str, Any] = {"model": model.id, "state": model.state_word()}
    if model.resident:
        eff = model.runner.machine.effective
        return {**doc, "loaded": True, "settings": eff.as_dict(), "unload": [], "wait_for": [], "refused": None,
                "memory": _mem(model.measured or model.estimate), "why": "already loaded: loading it does nothing"}
    r = await asyncio.to_thread(room.room, pool.cfg.memory_budget_mib)
    learned = await asyncio.to_thread(model.runner.learned)
    view = pool.view(r)
    target = next(m for m in view.models if m.id == model.id)
    pv = rs.preview(view, target)
    settings, source = _first(model, pv.plan, learned, pool.cfg.estimate_vram)
    return {**doc, "loaded": False,
            "placement": pv.plan.as_dict() if pv.plan is not None else None,
            "settings": settings.as_dict(), "settings_from": source,
            "layers": settings.n_gpu_layers, "ctx_size": settings.ctx_size,
            "unload": list(pv.unload), "wait_for": list(pv.wait_for), "refused": pv.refused,
            "memory": _mem(pv.need),
            "room": {"gpu_free_mib": {str(g.index): round(g.free_mib) for g in r.gpus},
                     "host_available_mib": None if r.host_available_mib is None else round(r.host_available_mib),
                     "memory_budget_mib": r.host_budget_mib},
            "why": pv.refused or (pv.plan.why if pv.plan is not None else "no GPU placement here (llama-server's "
                                                                           "default devices)")}


def _mem(m: rs.Mem) -> dict[str, Any]:
    return {"gpu_mib": {str(i): round(x) for i, x in enumerate(m.gpu_mib) if x}, "host_mib": round(m.host_mib)}
