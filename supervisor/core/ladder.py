"""The out-of-memory ladder: after an OOM, which settings to try next. Pure functions, no I/O.

Order: another placement where another GPU has room for all of it (several GPUs) → fewer GPU layers (on
several GPUs: only on the GPU that ran out) → smaller context (down to a floor) → vision projector on CPU →
CPU only. The next layer count comes from evidence where there is some (the failed allocation size and the
free VRAM), otherwise from halving the last count that failed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from .estimate import Footprint, layers_after_oom, mib, offloadable
from .placement import Choice, Gpu, Placement, Plan, ask_for, place, usable_mib

Layers = int | Literal["auto", "all"]
# Compute buffers and the CUDA context need room beyond the weights: keep this much VRAM spare.
VRAM_HEADROOM_MIB = 512.0
VRAM_USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class RunSettings:
    """The knobs the supervisor may turn away from the profile's values."""

    n_gpu_layers: Layers
    ctx_size: int
    mmproj_offload: bool = True
    cpu_only: bool = False
    placement: Placement | None = None  # the GPUs (several GPUs: core/placement.py); None: llama-server's default

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["placement"] = self.placement.as_dict() if self.placement is not None else None
        return d

    def describe(self) -> str:
        if self.cpu_only:
            return f"CPU only, ctx {self.ctx_size}"
        return (f"{self.n_gpu_layers} GPU layers" + (f" on {self.placement.describe()}" if self.placement else "")
                + f", ctx {self.ctx_size}" + ("" if self.mmproj_offload else ", projector on CPU"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSettings:
        placement = d.get("placement")
        return cls(
            n_gpu_layers=d["n_gpu_layers"],
            ctx_size=int(d["ctx_size"]),
            mmproj_offload=bool(d.get("mmproj_offload", True)),
            cpu_only=bool(d.get("cpu_only", False)),
            placement=Placement.from_dict(placement) if isinstance(placement, dict) else None,
        )


def placed(s: RunSettings, plan: Plan, *, cut: bool) -> RunSettings:
    """`s` on the GPUs of `plan`. A split carries its layer counts (llama-server's own fitting gives up on a
    split it did not make); fewer layers than asked only when `cut` (the estimate is on), and never instead of
    'auto' on one GPU, where llama-server fits the layers itself, measuring."""
    p = plan.placement
    if p is None or s.cpu_only:
        return s
    if plan.kind == "one" or (plan.kind == "partial" and len(p.gpus) == 1 and s.n_gpu_layers == "auto"):
        return replace(s, placement=p)
    if plan.kind == "split" or cut:
        return replace(s, placement=p, n_gpu_layers=plan.layers)
    return replace(s, placement=replace(p, split=()))  # the GPUs, all layers asked: the ladder learns the rest


@dataclass(frozen=True)
class Evidence:
    """What is known after an out-of-memory exit."""

    alloc_mib: float | None = None  # the device allocation that failed
    free_vram_mib: float | None = None  # free VRAM now (NVML), after the child is gone
    model_layers: int | None = None  # block_count from the GGUF metadata
    footprint: Footprint | None = None  # per-layer sizes from the GGUF metadata
    compute: bool = False  # the failure was a compute buffer (after the weights were loaded)
    others_freed: bool = False  # idle models were unloaded since (several models): the same settings may fit now
    # Several GPUs: each one's free room after the child is gone (with llama-server's names), the one that ran out
    # (NVML index, from the log), those that ran out earlier in this series of starts, what the profile allows,
    # and the placement the child really ran with.
    gpus: tuple[Gpu, ...] = ()
    ran_out: int | None = None
    avoid: frozenset[int] = frozenset()
    choice: Choice = "auto"
    placement: Placement | None = None


@dataclass(frozen=True)
class Rung:
    settings: RunSettings
    step: Literal["placement", "gpu_layers", "ctx_size", "mmproj_cpu", "cpu_only"]
    reason: str


def estimate_layers(n_tried: int, ev: Evidence) -> int | None:
    """Layers that should fit, from the failed allocation for `n_tried` layers and the free VRAM."""
    if ev.alloc_mib is None or ev.free_vram_mib is None or n_tried <= 0 or ev.alloc_mib <= 0:
        return None
    per_layer = ev.alloc_mib / n_tried
    usable = max(0.0, (ev.free_vram_mib - VRAM_HEADROOM_MIB) * VRAM_USABLE_FRACTION)
    return math.floor(usable / per_layer)


def _elsewhere(cur: RunSettings, ev: Evidence, fp: Footprint, placement: Placement) -> Rung | None:
    """All of it on GPUs that did not run out, when one of them (or a few) has the room."""
    out = ev.avoid | ({ev.ran_out} if ev.ran_out is not None else set(placement.gpus))
    layers = offloadable(cur.n_gpu_layers, fp.n_layers)
    plan = place(ask_for(fp, layers, mmproj_offload=cur.mmproj_offload),
                 [g for g in ev.gpus if g.index not in out], ev.choice)
    if not plan.whole or plan.placement is None:
        return None
    new = replace(cur, placement=plan.placement,
                  n_gpu_layers=plan.layers if plan.kind == "split" else cur.n_gpu_layers)
    where = f"GPU {ev.ran_out}" if ev.ran_out is not None else placement.describe()
    return Rung(new, "placement", f"{where} ran out of memory, moved to {plan.placement.describe()}: {plan.why}")


def _trim(cur: RunSettings, ev: Evidence, fp: Footprint, placement: Placement) -> Rung | None:
    """Split over GPUs: fewer layers on the GPU that ran out only, the others keep theirs."""
    if ev.ran_out not in placement.gpus or not placement.split:
        return None
    j = placement.gpus.index(ev.ran_out)
    g = next((g for g in ev.gpus if g.index == ev.ran_out), None)
    if g is None:
        return None
    budget = usable_mib(g) - (fp.mmproj_mib if j == 0 and cur.mmproj_offload else 0.0)
    if ev.compute and ev.alloc_mib:
        budget -= ev.alloc_mib  # the compute buffer that failed needs that room next time too
    had = placement.split[j]
    now = max(0, min(had - 1, math.floor(max(0.0, budget) / fp.mean_layer_mib)))
    split = list(placement.split)
    split[j] = now
    kept = [i for i, c in enumerate(split) if c > 0]
    if not kept:
        return None
    new_p = Placement(tuple(placement.gpus[i] for i in kept), tuple(placement.devices[i] for i in kept),
                      tuple(split[i] for i in kept) if len(kept) > 1 else (),
                      tuple(placement.uuids[i] for i in kept) if placement.uuids else ())
    others = ", ".join(f"GPU {placement.gpus[i]} {split[i]}" for i in kept if i != j)
    return Rung(replace(cur, n_gpu_layers=sum(split), placement=new_p), "gpu_layers",
                f"GPU layers on GPU {ev.ran_out} {had} → {now} (estimate: ~{mib(fp.mean_layer_mib)} MiB a layer, "
                f"{g.free_mib:.0f} MiB free there); the others keep theirs ({others})")


def moved(cur: RunSettings, ev: Evidence) -> Rung | None:
    """Several GPUs: all of it on other GPUs that have the room (None: none has)."""
    if cur.placement is None and ev.placement is not None and not cur.cpu_only:
        cur = replace(cur, placement=ev.placement)  # the GPUs the child really ran on (decided at its spawn)
    if cur.cpu_only or cur.placement is None or not ev.gpus or ev.footprint is None:
        return None
    return _elsewhere(cur, ev, ev.footprint, cur.placement)


def next_rung(cur: RunSettings, ev: Evidence, *, min_ctx: int, has_mmproj: bool) -> Rung | None:
    """The next settings to try after an out-of-memory exit with `cur`, or None when nothing is left."""
    if (rung := moved(cur, ev)) is not None:
        return rung
    if cur.placement is None and ev.placement is not None and not cur.cpu_only:
        cur = replace(cur, placement=ev.placement)
    if not cur.cpu_only and cur.placement is not None and ev.gpus and ev.footprint is not None:
        rung = _trim(cur, ev, ev.footprint, cur.placement)
        if rung is not None:
            return rung
    if not cur.cpu_only:
        n = offloadable(cur.n_gpu_layers, ev.model_layers)
        if n is not None and n > 1:
            if ev.footprint is not None and ev.free_vram_mib is not None:
                new = layers_after_oom(ev.footprint, ev.free_vram_mib, n, ev.alloc_mib, compute=ev.compute,
                                       mmproj_offload=cur.mmproj_offload)
                how = (f"estimate: ~{mib(ev.footprint.mean_layer_mib)} MiB a layer, {ev.free_vram_mib:.0f} MiB free"
                       + (f", {ev.alloc_mib:.0f} MiB compute buffer failed" if ev.compute and ev.alloc_mib else ""))
            elif (est := estimate_layers(n, ev)) is not None:
                new, how = min(est, n - 1), (
                    f"estimate: {ev.alloc_mib:.0f} MiB failed for {n} layers, {ev.free_vram_mib:.0f} MiB free"
                )
            else:
                new, how = n // 2, f"no VRAM figures: halving {n}"
            # Even when the estimate says nothing fits, step down to one layer before touching the context.
            new = max(1, new)
            return Rung(replace(cur, n_gpu_layers=new), "gpu_layers", f"GPU layers {n} → {new} ({how})")
    if cur.ctx_size > min_ctx:
        new_ctx = max(min_ctx, cur.ctx_size // 2)
        return Rung(replace(cur, ctx_size=new_ctx), "ctx_size", f"context {cur.ctx_size} → {new_ctx}")
    if has_mmproj and cur.mmproj_offload and not cur.cpu_only:
        return Rung(replace(cur, mmproj_offload=False), "mmproj_cpu", "vision projector moved to the CPU")
    if not cur.cpu_only:
        return Rung(replace(cur, n_gpu_layers=0, cpu_only=True), "cpu_only", "CPU only")
    return None
