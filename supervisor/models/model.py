"""One model's place in the pool: its profile, its runner and proxy while loaded, what it holds (measured or
estimated), the requests waiting for it, and why it is going. The pool (pool.py) is its only writer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..child.runner import Runner
from ..core import residency as rs
from ..core.lifecycle import State
from ..spec.loaded import Loaded
from ..telemetry.metrics import Metrics
from ..web.api.proxy import Proxy

# Lifecycle state → what residency sees.
_SEEN = {State.READY: rs.ModelState.LOADED, State.FAILED: rs.ModelState.FAILED}


@dataclass
class Slot:
    id: str
    loaded: Loaded
    metrics: Metrics
    estimate: rs.Mem = field(default_factory=rs.Mem)
    runner: Runner | None = None
    proxy: Proxy | None = None
    measured: rs.Mem | None = None
    in_flight: int = 0  # admitted requests not yet finished (including those waiting for a (re)start)
    waiting: int = 0  # requests waiting for this model to be loaded
    since: float | None = None  # when the oldest of them began waiting
    wanted_since: float | None = None  # a load asked for without a request: start, preload, admin
    wanted_by: str = ""  # which of those (the load's cause in metrics and on the timeline)
    draining: str = ""  # why it is going (set: no new requests are admitted)
    unloading: bool = False
    holding: bool = False  # a reload restarts it: new requests wait, it stays loaded
    last_used: float = 0.0
    waiting_why: str = ""
    rejected: tuple[int, str] = (0, "")  # (count, message): waiters compare the count they started with
    loads: int = 0
    last_unload: dict[str, Any] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def admitting(self) -> bool:
        return self.runner is not None and not self.draining and not self.unloading and not self.holding

    def seen(self) -> rs.ModelState:
        if self.runner is None:
            return rs.ModelState.UNLOADED
        if self.unloading:
            return rs.ModelState.LOADING  # memory in flux until the child is gone
        state = _SEEN.get(self.runner.machine.state, rs.ModelState.LOADING)
        if self.draining and state is rs.ModelState.LOADED:
            return rs.ModelState.DRAINING
        return state

    def as_model(self) -> rs.Model:
        p = self.loaded.profile
        return rs.Model(self.id, self.seen(), self.measured or self.estimate, self.measured is not None,
                        self.in_flight, p.pinned, p.ttl_s, self.last_used, self.draining)
