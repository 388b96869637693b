"""What a child's exit was: its cause (core/crash.py) and, after an out-of-memory exit, the evidence the ladder
needs (free VRAM once the driver has released the dead child's, the model's footprint)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from ..core.capabilities import Capabilities
from ..core.crash import OOM_CAUSES, Cause, Exit, Verdict, classify
from ..core.ladder import Evidence, RunSettings, moved
from ..core.placement import Gpu, Placement
from ..host import devices
from ..spec.profile import Profile
from ..telemetry.metrics import Metrics
from . import vram
from .process import Child, oom_kill_count

log = structlog.get_logger("supervisor")


async def examine(child: Child, rc: int, oom_before: int | None, gen: int, *, killed_as: Cause | None = None,
                  profile: Profile, ctx_size: int, model_layers: int | None, release_wait_s: float, metrics: Metrics,
                  free_others: Callable[[frozenset[int] | None], Awaitable[bool]] | None = None,
                  caps: Capabilities | None = None, settings: RunSettings | None = None,
                  avoid: frozenset[int] = frozenset()) -> tuple[Verdict, Evidence]:
    """Runs after ChildGone: the machine is already out of `ready` while this waits for NVML. `killed_as`: the
    supervisor killed a hung child (unresponsive, wedged), so metrics and the journal name that cause. `free_others`
    (several models): asked after an out-of-memory exit with the GPUs that ran out (None: unknown), True when
    it unloaded idle models to make room; not asked when another GPU has room for all of it (the ladder moves
    it there instead). `settings`: what the child ran with, its GPUs too; `avoid`: GPUs that ran out since its
    last ready start."""
    oom_after = await asyncio.to_thread(oom_kill_count)
    oom_killed = None if oom_before is None or oom_after is None else oom_after > oom_before
    verdict = classify(Exit(rc, tuple(child.tail)[-80:], child.signalled, oom_killed, killed_as))
    free, fp, freed = None, None, False
    gpus: list[Gpu] = []
    placement = settings.placement if settings is not None else None
    ran_out = ran_out_on(verdict.alloc_device, placement, gpus)
    if verdict.cause in OOM_CAUSES:
        infos = await vram.after_exit(child.pid, release_wait_s)
        if infos:
            fp = await vram.model_footprint(profile, ctx_size)
            if caps is not None and devices.places(profile):
                gpus = await vram.named_gpus(caps, infos=infos)
            ran_out = ran_out_on(verdict.alloc_device, placement, gpus)
            # The ladder's layer estimate is for the GPU that ran out (else the first the child used, else GPU 0).
            at = ran_out if ran_out is not None else placement.gpus[0] if placement is not None else infos[0].index
            free = next((g.memory_free_mib for g in infos if g.index == at), infos[0].memory_free_mib)
    ev = Evidence(alloc_mib=verdict.alloc_mib, free_vram_mib=free, model_layers=model_layers, footprint=fp,
                  compute=verdict.cause is Cause.OOM_COMPUTE, gpus=tuple(gpus), ran_out=ran_out,
                  avoid=avoid | ({ran_out} if ran_out is not None else set()), choice=profile.gpus,
                  placement=placement)
    if verdict.cause in OOM_CAUSES and free_others is not None and (settings is None or moved(settings, ev) is None):
        on = frozenset({ran_out}) if ran_out is not None else frozenset(placement.gpus) if placement else None
        freed = await free_others(on)  # idle others (on that GPU) go first, then the same settings again
    if verdict.cause is not Cause.STOPPED:
        metrics.restarts.labels(verdict.cause.value).inc()
        log.warning("child_exit", gen=gen, pid=child.pid, returncode=rc, cause=verdict.cause.value,
                    detail=verdict.detail)
    else:
        log.info("child_exit", gen=gen, pid=child.pid, returncode=rc, cause=verdict.cause.value)
    return verdict, replace(ev, others_freed=freed)


def ran_out_on(cuda: int | None, placement: Placement | None, gpus: list[Gpu]) -> int | None:
    """The NVML index of the GPU the log says ran out ("on device 1", "CUDA1 buffer": CUDA's number, which is
    NVML's order under CUDA_DEVICE_ORDER=PCI_BUS_ID, see core/placement.py). One GPU used: that one."""
    if cuda is not None:
        name = f"CUDA{cuda}"
        if placement is not None and name in placement.devices:
            return placement.gpus[placement.devices.index(name)]
        return next((g.index for g in gpus if g.device == name), None)
    if placement is not None and len(placement.gpus) == 1:
        return placement.gpus[0]
    return None
