"""NVML's GPUs as the placement sees them: with their room and llama-server's name for each (core/placement.py
explains the matching). Blocking (NVML): use asyncio.to_thread from the event loop."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..core.capabilities import Capabilities
from ..core.command import GPU_CHOICE_ENV
from ..core.placement import Gpu, match_devices
from . import gpu

if TYPE_CHECKING:
    from ..spec.profile import Profile


def places(p: Profile) -> bool:
    """Does the supervisor choose this profile's GPUs? Not when its environment chooses them (CUDA_VISIBLE_DEVICES),
    nor when it runs on the CPU (Metal off)."""
    return not any(k in p.env for k in GPU_CHOICE_ENV) and p.metal is not False


def as_gpus(infos: Sequence[gpu.GpuInfo], extra_mib: Mapping[int, float] | None = None) -> list[Gpu]:
    """`extra_mib`: room on top of NVML's free memory, per NVML index (what the model's own child holds)."""
    extra = extra_mib or {}
    return [Gpu(g.index, g.name, g.memory_total_mib, g.memory_free_mib + extra.get(g.index, 0.0), g.uuid)
            for g in infos]


def named(caps: Capabilities, infos: Sequence[gpu.GpuInfo] | None = None,
          extra_mib: Mapping[int, float] | None = None) -> tuple[list[Gpu], str | None]:
    """The GPUs with llama-server's device names, and why none could be matched (None: matched or no GPU)."""
    gpus = as_gpus(gpu.snapshot() if infos is None else infos, extra_mib)
    if not gpus:
        return [], None
    return match_devices(caps.listing, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
