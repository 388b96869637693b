"""The memory facts residency decides on: free VRAM per GPU, available host RAM, what a child really holds,
and what a profile will need before it ever ran. Blocking (NVML, /proc, GGUF reads): use asyncio.to_thread."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import psutil

from ..core.estimate import MIB
from ..core.placement import ask_for
from ..core.residency import Mem, Placing, Room, estimate_need
from . import devices, gpu
from .devices import as_gpus
from .gguf import footprint

if TYPE_CHECKING:
    from ..core.capabilities import Capabilities
    from ..spec.profile import Profile


def room(budget_mib: float | None) -> Room:
    infos = gpu.snapshot()
    free = {g.index: g.memory_free_mib for g in infos}
    # A GPU NVML could not read has no room to offer: 0 keeps the others at their NVML index.
    return Room(gpu_free_mib=tuple(free.get(i, 0.0) for i in range(max(free, default=-1) + 1)), host_budget_mib=budget_mib,
                host_available_mib=available_host_mib(), gpus=tuple(as_gpus(infos)))


def available_host_mib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def measure(pid: int) -> Mem | None:
    """What child `pid` holds now: its VRAM on each GPU (NVML's per-process figure) and its RSS."""
    try:
        rss = psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        return None
    return Mem(gpu.held_by(pid), round(rss, 1))


def placing(p: Profile, caps: Capabilities) -> Placing | None:
    """What residency needs to place `p` on the GPUs (several GPUs: core/placement.py), at the profile's own
    settings: None where the supervisor does not place it (no GPU the binary names, GPUs chosen by its env, no
    GGUF sizes)."""
    if not devices.places(p):
        return None
    gpus, _ = devices.named(caps)
    if not any(g.device for g in gpus):
        return None
    try:
        fp = footprint(p.model, p.ctx_size, p.cache_type_k, p.cache_type_v, p.mmproj)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error):
        return None
    layers = p.n_gpu_layers if isinstance(p.n_gpu_layers, int) else None
    names = {g.index: g.device for g in gpus}
    return Placing(ask_for(fp, layers, mmproj_offload=p.mmproj is not None), p.gpus,
                   tuple(names.get(i, "") for i in range(max(names, default=-1) + 1)))


def estimate(p: Profile) -> Mem:
    """The need of a profile from its GGUF sizes, at the profile's own settings (the ladder may lower them)."""
    try:
        fp = footprint(p.model, p.ctx_size, p.cache_type_k, p.cache_type_v, p.mmproj)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error):
        fp = None
    try:
        model_mib = p.model.stat().st_size / MIB
        mmproj_mib = p.mmproj.stat().st_size / MIB if p.mmproj is not None else 0.0
    except OSError:
        model_mib = mmproj_mib = 0.0
    layers = None if p.n_gpu_layers in ("auto", "all") else int(p.n_gpu_layers)
    return estimate_need(fp, model_mib, mmproj_mib, layers, on_gpu=bool(gpu.snapshot()) and p.metal is not False)
