"""The out-of-memory ladder: after an OOM, which settings to try next. Pure functions, no I/O.

Order: fewer GPU layers → smaller context (down to a floor) → vision projector on CPU → CPU only.
The next layer count comes from evidence where there is some (the failed allocation size and the
free VRAM), otherwise from halving the last count that failed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from .estimate import Footprint, layers_after_oom, mib, offloadable

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.cpu_only:
            return f"CPU only, ctx {self.ctx_size}"
        return f"{self.n_gpu_layers} GPU layers, ctx {self.ctx_size}" + ("" if self.mmproj_offload else ", projector on CPU")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSettings:
        return cls(
            n_gpu_layers=d["n_gpu_layers"],
            ctx_size=int(d["ctx_size"]),
            mmproj_offload=bool(d.get("mmproj_offload", True)),
            cpu_only=bool(d.get("cpu_only", False)),
        )


@dataclass(frozen=True)
class Evidence:
    """What is known after an out-of-memory exit."""

    alloc_mib: float | None = None  # the device allocation that failed
    free_vram_mib: float | None = None  # free VRAM now (NVML), after the child is gone
    model_layers: int | None = None  # block_count from the GGUF metadata
    footprint: Footprint | None = None  # per-layer sizes from the GGUF metadata
    compute: bool = False  # the failure was a compute buffer (after the weights were loaded)
    others_freed: bool = False  # idle models were unloaded since (several models): the same settings may fit now


@dataclass(frozen=True)
class Rung:
    settings: RunSettings
    step: Literal["gpu_layers", "ctx_size", "mmproj_cpu", "cpu_only"]
    reason: str


def estimate_layers(n_tried: int, ev: Evidence) -> int | None:
    """Layers that should fit, from the failed allocation for `n_tried` layers and the free VRAM."""
    if ev.alloc_mib is None or ev.free_vram_mib is None or n_tried <= 0 or ev.alloc_mib <= 0:
        return None
    per_layer = ev.alloc_mib / n_tried
    usable = max(0.0, (ev.free_vram_mib - VRAM_HEADROOM_MIB) * VRAM_USABLE_FRACTION)
    return math.floor(usable / per_layer)


def next_rung(cur: RunSettings, ev: Evidence, *, min_ctx: int, has_mmproj: bool) -> Rung | None:
    """The next settings to try after an out-of-memory exit with `cur`, or None when nothing is left."""
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
