"""What a child's exit was: its cause (core/crash.py) and, after an out-of-memory exit, the evidence the ladder
needs (free VRAM once the driver has released the dead child's, the model's footprint)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from ..core.crash import OOM_CAUSES, Cause, Exit, Verdict, classify
from ..core.ladder import Evidence
from ..spec.profile import Profile
from ..telemetry.metrics import Metrics
from . import vram
from .process import Child, oom_kill_count

log = structlog.get_logger("supervisor")


async def examine(child: Child, rc: int, oom_before: int | None, gen: int, *, profile: Profile, ctx_size: int,
                  model_layers: int | None, release_wait_s: float, metrics: Metrics,
                  free_others: Callable[[], Awaitable[bool]] | None = None) -> tuple[Verdict, Evidence]:
    """Runs after ChildGone: the machine is already out of `ready` while this waits for NVML. `free_others`
    (several models): asked after an out-of-memory exit, True when it unloaded idle models to make room."""
    oom_after = await asyncio.to_thread(oom_kill_count)
    oom_killed = None if oom_before is None or oom_after is None else oom_after > oom_before
    verdict = classify(Exit(rc, tuple(child.tail)[-80:], child.signalled, oom_killed))
    free, fp, freed = None, None, False
    if verdict.cause in OOM_CAUSES and free_others is not None:
        freed = await free_others()  # idle others go first, then the same settings again
    if verdict.cause in OOM_CAUSES:
        free = await vram.free_after_exit(child.pid, release_wait_s)
        if free is not None:
            fp = await vram.model_footprint(profile, ctx_size)
    if verdict.cause is not Cause.STOPPED:
        metrics.restarts.labels(verdict.cause.value).inc()
        log.warning("child_exit", gen=gen, pid=child.pid, returncode=rc, cause=verdict.cause.value,
                    detail=verdict.detail)
    else:
        log.info("child_exit", gen=gen, pid=child.pid, returncode=rc, cause=verdict.cause.value)
    return verdict, Evidence(alloc_mib=verdict.alloc_mib, free_vram_mib=free, model_layers=model_layers,
                             footprint=fp, compute=verdict.cause is Cause.OOM_COMPUTE, others_freed=freed)
