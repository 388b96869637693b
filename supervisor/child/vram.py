"""The runner's VRAM questions, answered from NVML and the model's GGUF sizes (host/), decided in core/.

Where a child goes (several GPUs: core/placement.py) and with how many layers, before a start; how much is
free on each GPU once a dead child's memory is released, after an out-of-memory exit; and whether more fits
now, while running on reduced settings. Blocking reads go to worker threads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import structlog

from ..core import estimate
from ..core.capabilities import Capabilities
from ..core.climb import Fit
from ..core.ladder import RunSettings, placed
from ..core.placement import Gpu, Plan, ask_for, place
from ..host import devices, gpu
from ..host.gguf import footprint
from ..spec.loaded import base_settings
from ..spec.profile import Profile

log = structlog.get_logger("supervisor")


async def model_footprint(p: Profile, ctx_size: int) -> estimate.Footprint | None:
    try:
        return await asyncio.to_thread(footprint, p.model, ctx_size, p.cache_type_k, p.cache_type_v, p.mmproj)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("footprint_unavailable", error=repr(exc))
        return None


async def named_gpus(caps: Capabilities, child_pid: int | None = None,
                     infos: list[gpu.GpuInfo] | None = None) -> list[Gpu]:
    """The GPUs with llama-server's names and their room: free now, plus what `child_pid` holds on each."""
    if infos is None:
        infos = await asyncio.to_thread(gpu.snapshot)
    held = {g.index: g.held_by(child_pid) for g in infos} if child_pid is not None else None
    gpus, unmatched = devices.named(caps, infos, held)
    if unmatched is not None:
        log.info("gpus_unmatched", why=unmatched)  # no placement: llama-server's own default
    return gpus


async def plan_now(p: Profile, caps: Capabilities, settings: RunSettings, child_pid: int | None = None) -> Plan | None:
    """Where `settings` would go now (the room `child_pid` holds counted as free); None without GPU facts."""
    if not devices.places(p) or settings.cpu_only:
        return None
    gpus = await named_gpus(caps, child_pid)
    if not any(g.device for g in gpus):
        return None
    fp = await model_footprint(p, settings.ctx_size)
    if fp is None:
        return None
    layers = settings.n_gpu_layers if isinstance(settings.n_gpu_layers, int) else None
    return place(ask_for(fp, layers, mmproj_offload=settings.mmproj_offload and p.mmproj is not None), gpus, p.gpus)


async def settle(p: Profile, caps: Capabilities, settings: RunSettings, *, cut: bool
                 ) -> tuple[RunSettings, Plan | None]:
    """`settings` with GPUs: a placement decided now when they have none, or one whose GPUs are no longer the
    same cards (by UUID). `cut`: a plan with fewer layers may lower them (estimate_vram)."""
    if settings.placement is not None and not settings.cpu_only:
        infos = {g.index: g.uuid for g in await asyncio.to_thread(gpu.snapshot)}
        same = all(infos.get(i) == u for i, u in zip(settings.placement.gpus, settings.placement.uuids, strict=False))
        if same and all(i in infos for i in settings.placement.gpus):
            return settings, None
        log.warning("placement_stale", placement=settings.placement.as_dict(), gpus=infos)
        settings = RunSettings(settings.n_gpu_layers, settings.ctx_size, settings.mmproj_offload, settings.cpu_only)
    plan = await plan_now(p, caps, settings)
    if plan is None:
        return settings, None
    return placed(settings, plan, cut=cut), plan


async def first_settings(p: Profile, caps: Capabilities, learned: RunSettings | None, model_layers: int | None, *,
                         plan: Plan | None, estimate: bool
                         ) -> tuple[RunSettings, RunSettings | None, RunSettings | None, str | None, dict[str, Any] | None]:
    """A start's settings: (the profile's own, placed where `plan` says or where all of it goes now; the learned
    settings still worth starting from; the first start's when not those; why; the estimate's figures). Placing
    is part of what the profile asks, not an adjustment; only a cut is (estimate_vram)."""
    raw = base_settings(p)
    if plan is not None:
        base = placed(raw, plan, cut=False)
    else:
        base, plan = await settle(p, caps, raw, cut=False)
    if plan is not None:
        log.info("placement", profile=p.name, kind=plan.kind, placement=plan.as_dict(), why=plan.why)
    if learned is not None and base.placement is not None and replace(learned, placement=None) == raw:
        learned = None  # it ran as asked: placed afresh, by the room there is now
    if learned is not None or not estimate:
        return base, learned, learned, None, None
    if plan is not None:
        return base, None, *estimated(raw, base, plan)
    return base, None, *await pre_launch(p, base, model_layers)


def estimated(raw: RunSettings, base: RunSettings, plan: Plan
              ) -> tuple[RunSettings | None, str | None, dict[str, Any] | None]:
    """The first start when the plan has fewer layers than asked (the estimate is on): (settings or None to
    keep `base`, why, the figures for /status)."""
    figures = {"layers": plan.layers, "plan": plan.as_dict(), "describe": plan.why}
    cut = placed(raw, plan, cut=True)
    if cut == base:
        return None, None, figures
    log.info("vram_estimate", plan=plan.as_dict())
    return cut, f"pre-launch estimate: {plan.why}", figures


async def fit_now(p: Profile, ctx_size: int, child_pid: int | None = None, *, mmproj_offload: bool = True,
                  caps: Capabilities | None = None) -> tuple[Fit | None, dict[str, Any] | None]:
    """What fits at `ctx_size` in the VRAM free now plus what the running child (`child_pid`) holds: with
    `caps` and GPUs it can name, over the GPUs the profile allows (core/placement.py); else on the first GPU.
    Returns (fit, the figures for /status), or (None, None) without NVML or GGUF sizes."""
    infos = await asyncio.to_thread(gpu.snapshot)
    if not infos:
        return None, None
    fp = await model_footprint(p, ctx_size)
    if fp is None:
        return None, None
    offload = mmproj_offload and p.mmproj is not None
    gpus = await named_gpus(caps, child_pid, infos) if caps is not None and devices.places(p) else []
    if any(g.device for g in gpus):
        plan = place(ask_for(fp, None, mmproj_offload=offload), gpus, p.gpus)
        figures = {"layers": plan.layers, "free_mib": {str(g.index): round(g.free_mib) for g in gpus},
                   "ctx_size": ctx_size, "plan": plan.as_dict(), "describe": plan.why}
        return Fit(plan.layers, fp.n_layers, plan.why, plan.placement), figures
    g = infos[0]
    held = g.held_by(child_pid) if child_pid is not None else 0.0
    est = estimate.fit_layers(fp, g.memory_free_mib + held, mmproj_offload=offload)
    words = est.describe() + (f", {held:.0f} MiB of it held by the running child" if held else "")
    figures = {"layers": est.layers, "free_mib": round(g.memory_free_mib), "child_mib": round(held),
               "ctx_size": ctx_size, "describe": words}
    return Fit(est.layers, fp.n_layers, words), figures


async def pre_launch(p: Profile, base: RunSettings, model_layers: int | None
                     ) -> tuple[RunSettings | None, str | None, dict[str, Any] | None]:
    """Without GPUs to place on: an explicit layer count that clearly does not fit the first GPU's free VRAM
    starts at the estimate instead. Returns (settings or None to keep the profile's, why, the figures for /status)."""
    if model_layers is None or base.n_gpu_layers == "auto":
        return None, None, None
    asked = estimate.requested_offload(base.n_gpu_layers, model_layers)
    if not asked:
        return None, None, None
    fit, figures = await fit_now(p, base.ctx_size)
    if fit is None or figures is None:
        return None, None, None
    figures = {"asked": asked, **figures}
    log.info("vram_estimate", asked=asked, fits=fit.layers, detail=fit.describe)
    if fit.layers >= asked:
        return None, None, figures
    return RunSettings(fit.layers, base.ctx_size), f"pre-launch estimate: {fit.describe}; the profile asks for {asked}", \
        figures


async def after_exit(pid: int, wait_s: float) -> list[gpu.GpuInfo]:
    """Drivers release VRAM a little after the process is gone: wait for it (bounded), then read every GPU."""
    deadline = time.monotonic() + wait_s
    while True:
        gpus = await asyncio.to_thread(gpu.snapshot)
        if not gpus:
            return []
        still = any(proc_pid == pid for g in gpus for proc_pid, _ in g.processes)
        if not still or time.monotonic() > deadline:
            return gpus
        await asyncio.sleep(0.2)
