"""One model the box offers: its profile, its one long-lived runner, what it holds (measured or estimated), the
requests waiting for it, and why it is going.

The runner is made with the model and lives as long as it is in the catalog: an unload stops its child, a load
starts one again, so whatever hangs on the runner (the proxy's quarantine and learned context costs, the page's
observers, generations) survives a swap. The pool (pool.py) writes the residency fields; the model itself keeps
its request counters (`in_flight`, `waiting`) through `admit`, `done` and `wait_ready`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..child.runner import Runner
from ..core import residency as rs
from ..core.lifecycle import State
from ..host import room
from ..spec.loaded import Loaded
from ..telemetry.metrics import Metrics

# Lifecycle state → what residency sees.
_SEEN = {State.READY: rs.ModelState.LOADED, State.FAILED: rs.ModelState.FAILED}


@dataclass
class Model:
    id: str
    loaded: Loaded
    metrics: Metrics
    runner: Runner
    estimate: rs.Mem = field(default_factory=rs.Mem)
    placing: rs.Placing | None = None  # several GPUs: what placing it takes (residency decides where)
    measured: rs.Mem | None = None
    total_slots: tuple[int, int] | None = None  # (generation, llama-server's /props total_slots) once asked
    resident: bool = False  # a child was started for it and it was not unloaded since
    in_flight: int = 0  # admitted requests not yet finished
    waiting: int = 0  # requests waiting for it: to be loaded, or its child to be ready
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

    def __post_init__(self) -> None:
        # Climbing back waits for a quiet model: requests in flight or waiting for it.
        self.runner.set_traffic(lambda: self.in_flight + self.waiting)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def admitting(self) -> bool:
        return self.resident and not self.draining and not self.unloading and not self.holding

    @property
    def profile_slots(self) -> int | None:
        """llama-server's own slot count for the current child, else the profile's `parallel` (None: unknown)."""
        if self.total_slots is not None and self.total_slots[0] == self.runner.machine.gen:
            return self.total_slots[1]
        return self.loaded.profile.parallel

    def seen(self) -> rs.ModelState:
        if not self.resident:
            return rs.ModelState.UNLOADED
        if self.unloading:
            return rs.ModelState.LOADING  # memory in flux until the child is gone
        state = _SEEN.get(self.runner.machine.state, rs.ModelState.LOADING)
        if self.draining and state is rs.ModelState.LOADED:
            return rs.ModelState.DRAINING
        return state

    def state_word(self) -> str:
        """loaded, loading, unloaded or failed (what clients see in /v1/models); draining counts as loaded."""
        seen = self.seen().value
        return "loaded" if seen == "draining" else seen

    def as_model(self) -> rs.Model:
        p = self.loaded.profile
        return rs.Model(self.id, self.seen(), self.measured or self.estimate, self.measured is not None,
                        self.in_flight, p.pinned, p.ttl_s, self.last_used, self.draining, self.placing)

    async def reckon(self) -> None:
        """What it will need before it ever ran: the GGUF estimate, and (several GPUs) what placing it takes."""
        p = self.loaded.profile
        self.estimate = await asyncio.to_thread(room.estimate, p)
        self.placing = await asyncio.to_thread(room.placing, p, self.loaded.caps)

    # ---- requests ------------------------------------------------------------------------------

    def start_waiting(self) -> None:
        self.waiting += 1
        self.metrics.queued.inc()
        if self.since is None:
            self.since = time.monotonic()

    def stop_waiting(self, t0: float) -> None:
        self.waiting -= 1
        self.metrics.queued.dec()
        self.metrics.queue_wait.observe(time.monotonic() - t0)
        if self.waiting == 0:
            self.since = None

    def admit(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def done(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        self.last_used = time.monotonic()

    async def wait_ready(self, deadline: float) -> tuple[bool, str]:
        """Wait (until `deadline`, monotonic) for the child to be ready: after an admitted request found it
        restarting. Counted as waiting, like a request waiting for a load: one counter, one deadline."""
        r = self.runner
        if r.ready:
            return True, ""
        t0 = time.monotonic()
        self.start_waiting()
        try:
            ok = await r.wait_ready(deadline - t0)
        finally:
            self.stop_waiting(t0)
        if ok:
            return True, ""
        m = r.machine
        return False, f"llama-server is not ready ({m.state.value}{': ' + m.reason if m.reason else ''})"
