"""Resident memory and CPU of the children, from /proc (psutil). Blocking: call through asyncio.to_thread."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psutil

# One psutil handle per child pid, kept between samples: CPU % is measured from the previous sample.
_procs: dict[int, psutil.Process] = {}


def sample(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {}
    proc = _procs.get(pid)
    try:
        if proc is None:
            proc = _procs[pid] = psutil.Process(pid)
            proc.cpu_percent(None)
        return {"rss_bytes": proc.memory_info().rss, "cpu_percent": proc.cpu_percent(None)}
    except psutil.Error:
        _procs.pop(pid, None)
        return {}


def forget_except(pids: Iterable[int]) -> None:
    """Drop the handles of children that are gone (several models: one handle each, not one for the box)."""
    keep = set(pids)
    for pid in [p for p in _procs if p not in keep]:
        del _procs[pid]
