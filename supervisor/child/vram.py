"""The runner's VRAM questions, answered from NVML and the model's GGUF sizes (host/), decided in core/.

Before a start (does the profile's layer count fit?), after an out-of-memory exit (how much is free once
the dead child's memory is released?) and while running on reduced settings (does more fit now?).
Blocking reads go to worker threads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from ..core import estimate
from ..core.climb import Fit
from ..core.ladder import RunSettings
from ..host import gpu
from ..host.gguf import footprint
from ..spec.profile import Profile

log = structlog.get_logger("supervisor")


async def model_footprint(p: Profile, ctx_size: int) -> estimate.Footprint | None:
    try:
        return await asyncio.to_thread(footprint, p.model, ctx_size, p.cache_type_k, p.cache_type_v, p.mmproj)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("footprint_unavailable", error=repr(exc))
        return None


async def fit_now(p: Profile, ctx_size: int, child_pid: int | None = None, *, mmproj_offload: bool = True
                  ) -> tuple[Fit | None, dict[str, Any] | None]:
    """What fits at `ctx_size` in the VRAM free now plus what the running child (`child_pid`) holds.
    Returns (fit, the figures for /status), or (None, None) without NVML or GGUF sizes."""
    gpus = await asyncio.to_thread(gpu.snapshot)
    if not gpus:
        return None, None
    fp = await model_footprint(p, ctx_size)
    if fp is None:
        return None, None
    g = gpus[0]
    held = sum(mib for pid, mib in g.processes if child_pid is not None and pid == child_pid)
    est = estimate.fit_layers(fp, g.memory_free_mib + held, mmproj_offload=mmproj_offload and p.mmproj is not None)
    words = est.describe() + (f", {held:.0f} MiB of it held by the running child" if held else "")
    figures = {"layers": est.layers, "free_mib": round(g.memory_free_mib), "child_mib": round(held),
               "ctx_size": ctx_size, "describe": words}
    return Fit(est.layers, fp.n_layers, words), figures


async def pre_launch(p: Profile, base: RunSettings, model_layers: int | None
                     ) -> tuple[RunSettings | None, str | None, dict[str, Any] | None]:
    """An explicit layer count that clearly does not fit free VRAM starts at the estimate instead.
    Returns (settings or None to keep the profile's, why, the figures for /status)."""
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


async def free_after_exit(pid: int, wait_s: float) -> float | None:
    """Drivers release VRAM a little after the process is gone: wait for it (bounded), then read free VRAM."""
    deadline = time.monotonic() + wait_s
    while True:
        gpus = await asyncio.to_thread(gpu.snapshot)
        if not gpus:
            return None
        still = any(proc_pid == pid for g in gpus for proc_pid, _ in g.processes)
        if not still or time.monotonic() > deadline:
            return gpus[0].memory_free_mib
        await asyncio.sleep(0.2)
