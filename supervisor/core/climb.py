"""Climbing back: after the out-of-memory ladder lowered the settings, when to go back up. Pure: no I/O.

The ladder is right for the VRAM that was free when it stepped down; a transient VRAM hog (a second
process, a desktop session) must not leave the model slower for good. So whenever the runner holds
reduced settings (learned at start, or while ready), it asks the VRAM estimate what fits *now* (free VRAM
plus what the child itself holds) at the profile's context, and these functions decide.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .estimate import offloadable, requested_offload
from .ladder import RunSettings
from .placement import Placement


@dataclass(frozen=True)
class Fit:
    """What the estimate says fits at the profile's context size."""

    layers: int  # offloadable layers that fit (model blocks + 1 for the output layer = everything)
    model_layers: int  # the model's block count
    describe: str  # the estimate in words, for the log and /status
    placement: Placement | None = None  # several GPUs: where those layers go (None: as the child runs now)


@dataclass(frozen=True)
class ClimbPolicy:
    enabled: bool = True
    retry_after_s: float = 3600.0  # a climb that ran out of memory is not tried again for this long


def is_reduced(base: RunSettings, eff: RunSettings, model_layers: int | None) -> bool:
    """Does `eff` run below what the profile asks for (fewer layers, smaller context, projector or all on CPU)?"""
    if eff == base:
        return False
    if (eff.cpu_only and not base.cpu_only) or eff.ctx_size < base.ctx_size or base.mmproj_offload > eff.mmproj_offload:
        return True
    asked, cur = requested_offload(base.n_gpu_layers, model_layers or 0), offloadable(eff.n_gpu_layers, model_layers)
    if asked is None:  # 'auto': llama.cpp fits it; an explicit count came from the ladder
        return isinstance(eff.n_gpu_layers, int)
    return cur is not None and cur < asked


def _layers(s: RunSettings, model_layers: int) -> int:
    return 0 if s.cpu_only else offloadable(s.n_gpu_layers, model_layers) or 0


def higher(a: RunSettings, b: RunSettings, model_layers: int) -> bool:
    """`a` asks more of the GPU than `b` and gives up nothing `b` has."""
    la, lb = _layers(a, model_layers), _layers(b, model_layers)
    if a.n_gpu_layers == "auto" and not a.cpu_only and b.n_gpu_layers != "auto":
        la = model_layers + 1  # 'auto' is at least as much as llama.cpp can fit
    no_less = la >= lb and a.ctx_size >= b.ctx_size and a.mmproj_offload >= b.mmproj_offload
    return no_less and (la > lb or a.ctx_size > b.ctx_size or a.mmproj_offload > b.mmproj_offload)


def target(base: RunSettings, eff: RunSettings, fit: Fit) -> RunSettings | None:
    """The highest settings, no higher than the profile's, that the estimate says fit and that are higher
    than `eff`; None when there is nothing to gain."""
    n = fit.model_layers
    asked = requested_offload(base.n_gpu_layers, n)
    where = fit.placement if fit.placement is not None else eff.placement
    if asked is None:
        # 'auto': go back to llama.cpp's own fitting when it would place more than eff has.
        cand = replace(base, placement=where) if fit.layers > _layers(eff, n) else None
    elif fit.layers >= asked:
        cand = replace(base, placement=where)
    else:
        cand = replace(base, n_gpu_layers=fit.layers, cpu_only=False, placement=where)
        if fit.layers < _layers(eff, n):
            return None  # the estimate says less fits than runs now: nothing to climb
    if cand is None or not higher(cand, eff, n):
        return None
    return cand


def decide(base: RunSettings, eff: RunSettings, fit: Fit | None, *, now: float, policy: ClimbPolicy,
           failed: tuple[RunSettings, float] | None) -> tuple[RunSettings, str] | None:
    """Climb from `eff` now? Returns (settings, reason in words) or None."""
    if not policy.enabled or fit is None or not is_reduced(base, eff, fit.model_layers):
        return None
    if failed is not None and now - failed[1] < policy.retry_after_s:
        return None
    cand = target(base, eff, fit)
    if cand is None:
        return None
    return cand, f"climb: {eff.describe()} → {cand.describe()} ({fit.describe})"

