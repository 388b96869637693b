"""The pool: the one owner of which models are loaded. One runner (today's whole lifecycle) per loaded profile.

Requests ask `acquire(model)`: a loaded model is admitted at once; otherwise the request joins its model's
waiting group and the pool loop decides (core/residency.py) what to load, unload, drain or refuse, and
carries it out — one step at a time, since unloading and loading change the memory the next decision
reads. What a model needs is its measured VRAM and RSS once it was ready, the GGUF estimate before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from ..child import vram
from ..child.runner import Runner
from ..core import residency as rs
from ..core.catalog import resolve
from ..core.lifecycle import Machine, State
from ..host import room
from ..host.sdnotify import Notifier
from ..spec.settings import Config
from ..telemetry.pool_metrics import PoolMetrics
from ..web.api.proxy import Proxy
from .catalog import Catalog
from .model import Slot

log = structlog.get_logger("pool")


class Unavailable(Exception):
    """A request the pool cannot serve now: the proxy answers 503 with Retry-After."""


class Pool:
    def __init__(self, cfg: Config, catalog: Catalog, default: str, *, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.default = default
        self.notifier = notifier or Notifier({})
        self.metrics = PoolMetrics()
        self.rules = rs.Rules(pass_over_s=cfg.swap_pass_over_s, wait_s=cfg.queue_wait_s)
        self.slots: dict[str, Slot] = {}
        self.names: dict[str, str] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.set_catalog(catalog)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.last_room: rs.Room | None = None
        self.on_runner: list[Callable[[Runner], None]] = []  # told of every runner the pool starts (the ops page)
        # told of every swap step as (model, action, cause, detail): load, drain, unload, refuse (the ops page)
        self.on_swap: list[Callable[[str, str, str, str], None]] = []

    # ---- the catalog ------------------------------------------------------------------------

    def set_catalog(self, catalog: Catalog) -> None:
        for mid, loaded in catalog.models.items():
            if mid not in self.slots:
                self.slots[mid] = Slot(mid, loaded, self.metrics.for_model(mid))
        self.names = catalog.names()
        self.errors, self.waiting_on = catalog.errors, catalog.waiting_on

    def resolve(self, requested: str | None) -> str | None:
        return resolve(requested, self.names, self.default, strict=True)

    @property
    def ids(self) -> list[str]:
        return list(self.slots)

    def runners(self) -> list[Runner]:
        return [s.runner for s in self.slots.values() if s.runner is not None]

    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.slots.values())

    # ---- starting and stopping --------------------------------------------------------------

    async def start(self) -> None:
        for slot in self.slots.values():
            slot.estimate = await asyncio.to_thread(room.estimate, slot.loaded.profile)
        now = time.monotonic()
        # The default first (the oldest demand is served first), then pinned and preloaded models.
        default = self.slots[self.default]
        default.wanted_since, default.wanted_by = now - 1.0, "start"
        for slot in self.slots.values():
            p = slot.loaded.profile
            if slot.id != self.default and (p.pinned or p.preload):
                slot.wanted_since, slot.wanted_by = now, "pinned" if p.pinned else "preload"
        self._loop_task = asyncio.ensure_future(self._loop())

    def shutting_down(self) -> None:
        """From now on nothing loads, and no runner starts a child again."""
        self.stopping = True
        for r in self.runners():
            r.shutting_down()

    async def stop(self) -> None:
        self.shutting_down()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await asyncio.gather(*(self._unload(s, "shutdown", "shutdown", count=False) for s in self.slots.values()
                               if s.runner is not None), return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    # ---- requests ----------------------------------------------------------------------------

    async def acquire(self, mid: str) -> Slot:
        """Admit a request for model `mid`, loading it (and making room) first if needed. Raises Unavailable."""
        slot = self.slots[mid]
        if slot.admitting:
            slot.in_flight += 1
            return slot
        if slot.waiting >= self.cfg.queue_max:
            raise Unavailable(f"model '{mid}' is not loaded and {slot.waiting} requests already wait for it")
        slot.waiting += 1
        if slot.since is None:
            slot.since = time.monotonic()
        self.metrics.queued.labels(mid).inc()
        rejected_before = slot.rejected[0]
        deadline = time.monotonic() + self.cfg.queue_wait_s
        self.wake()
        try:
            while not slot.admitting:
                if slot.rejected[0] != rejected_before:
                    raise Unavailable(slot.rejected[1])
                if mid not in self.slots or self.slots[mid] is not slot:
                    raise Unavailable(f"model '{mid}' was removed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"model '{mid}' was not loaded within {self.cfg.queue_wait_s:g}s"
                                      + (f": {slot.waiting_why}" if slot.waiting_why else ""))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.changed.wait(), left)
            slot.in_flight += 1
            return slot
        finally:
            slot.waiting -= 1
            self.metrics.queued.labels(mid).dec()
            if slot.waiting == 0:
                slot.since = None

    def release(self, slot: Slot) -> None:
        slot.in_flight -= 1
        slot.last_used = time.monotonic()
        if slot.in_flight == 0:
            self.wake()

    # ---- operator actions ----------------------------------------------------------------------

    def set_default(self, mid: str) -> None:
        """The settings file names another default: requests without a model and /health follow it now."""
        log.info("default_model", old=self.default, new=mid)
        self.default = mid
        self.request_load(mid, "start")

    def request_load(self, mid: str, cause: str = "admin") -> None:
        """Load `mid` (or keep it: a drain is called off; a failed start is tried again). Once an unload under
        way is done, the wish loads it again."""
        slot = self.slots[mid]
        if slot.runner is not None and slot.runner.machine.state is State.FAILED:
            slot.runner.retry_failed(f"{cause} load request")
        elif (slot.runner is None or slot.unloading) and slot.wanted_since is None:
            slot.wanted_since, slot.wanted_by = time.monotonic(), cause
        if not slot.unloading:
            slot.draining = ""
        self.wake()

    async def unload(self, mid: str, reason: str, detail: str) -> None:
        """Unload now, whatever the model's state (a removed profile): requests in flight are cut."""
        await self._unload(self.slots[mid], reason, detail)

    def request_unload(self, mid: str, reason: str = "admin") -> bool:
        """Drain `mid` and unload it once idle. False when there is nothing to unload."""
        slot = self.slots[mid]
        slot.wanted_since = None
        if slot.runner is None or slot.unloading:
            return False
        slot.draining = reason
        self._tell(mid, "drain", reason, "operator request: unloads once idle")
        self.wake()
        return True

    # ---- the loop ----------------------------------------------------------------------------

    def view(self, r: rs.Room) -> rs.View:
        demands = []
        for s in self.slots.values():
            if s.waiting:
                demands.append(rs.Demand(s.id, s.waiting, s.since or time.monotonic()))
            elif s.wanted_since is not None:
                demands.append(rs.Demand(s.id, 0, s.wanted_since))
        return rs.View(tuple(s.as_model() for s in self.slots.values()), r, tuple(demands))

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._step()
            except Exception as exc:  # the pool must go on deciding whatever one step did
                log.error("pool_error", error=repr(exc), exc_info=exc)
            busy = any(s.waiting or s.wanted_since is not None or s.draining or s.loaded.profile.ttl_s
                       for s in self.slots.values())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5 if busy else None)

    async def _step(self) -> None:
        if self.stopping:
            return
        pending = any(s.waiting or s.wanted_since is not None for s in self.slots.values())
        r = await asyncio.to_thread(room.room, self.cfg.memory_budget_mib) if pending else rs.Room()
        self.last_room = r if pending else self.last_room
        for action in rs.decide(self.view(r), self.rules, time.monotonic()):
            await self._perform(action)

    async def _perform(self, a: rs.Action) -> None:
        match a:
            case rs.Load(model=mid):
                await self._load(self.slots[mid])
            case rs.Unload(model=mid, reason=reason, detail=detail):
                await self._unload(self.slots[mid], reason, detail)
            case rs.Drain(model=mid, reason=reason, detail=detail):
                slot = self.slots[mid]
                if not slot.draining:
                    log.info("model_drain", model=mid, reason=reason, detail=detail)
                    slot.draining = reason
                    self._tell(mid, "drain", reason, detail)
            case rs.Wait(model=mid, detail=detail):
                slot = self.slots[mid]
                if slot.waiting_why != detail:
                    log.info("model_wait", model=mid, detail=detail)
                slot.waiting_why = detail
            case rs.Reject(model=mid, detail=detail):
                gone = self.slots.get(mid)
                if gone is not None:
                    log.warning("model_reject", model=mid, waiting=gone.waiting, detail=detail)
                    self._tell(mid, "refuse", "no room", detail)
                    gone.rejected = (gone.rejected[0] + 1, detail)
                    gone.wanted_since = None
                    gone.since = time.monotonic() if gone.waiting else None
                    gone.notify()

    async def _load(self, slot: Slot) -> None:
        cause = "request" if slot.waiting else (slot.wanted_by or "admin")
        log.info("model_load", model=slot.id, cause=cause, waiting=slot.waiting,
                 need=(slot.measured or slot.estimate).__dict__, measured=slot.measured is not None)
        runner = Runner(self.cfg, slot.loaded, metrics=slot.metrics, notifier=_BoxNotifier(self, slot))
        proxy = Proxy(runner)
        runner.observe(_Watch(self, slot))
        runner.on_oom(lambda on: self.after_oom(slot.id, on))
        for hook in self.on_runner:
            hook(runner)
        self._tell(slot.id, "load", cause, f"{slot.waiting} request(s) waiting" if slot.waiting else "")
        slot.wanted_since, slot.wanted_by, slot.draining, slot.waiting_why, slot.unloading = None, "", "", "", False
        slot.loads += 1
        self.metrics.swaps.labels(slot.id, cause).inc()
        await runner.start()
        # Admitted only now: before start() its machine is `stopped`, which a waiting request takes for an end.
        slot.runner, slot.proxy = runner, proxy
        slot.last_used = time.monotonic()
        slot.notify()  # the waiting group goes in together

    def _tell(self, mid: str, action: str, cause: str, detail: str) -> None:
        for hook in self.on_swap:
            try:  # an observer's bug must not stop a swap half-way
                hook(mid, action, cause, detail)
            except Exception as exc:  # noqa: BLE001
                log.error("swap_observer_error", error=repr(exc))

    def _task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _measure(self, slot: Slot, runner: Runner, gen: int) -> None:
        """What the child really holds once ready: from now on residency uses this, not the estimate."""
        child = runner.child
        if child is None or slot.runner is not runner:
            return
        mem = await asyncio.to_thread(room.measure, child.pid)
        # A child that stopped being ready while it was measured (an unload, a crash) is measured mid-teardown:
        # keep the figure only for the child that is still serving.
        if mem is not None and runner.machine.gen == gen and runner.ready and not slot.unloading:
            slot.measured = mem
            log.info("model_measured", model=slot.id, gpu_mib=mem.gpu_mib, host_mib=mem.host_mib,
                     estimate_gpu_mib=slot.estimate.gpu_mib, estimate_host_mib=slot.estimate.host_mib)
        self.wake()

    async def _unload(self, slot: Slot, reason: str, detail: str, *, count: bool = True) -> None:
        runner, proxy = slot.runner, slot.proxy
        if runner is None or slot.unloading:
            return
        log.info("model_unload", model=slot.id, reason=reason, detail=detail, in_flight=slot.in_flight)
        slot.unloading = True
        self._tell(slot.id, "unload", reason, detail)
        pid = runner.child.pid if runner.child is not None else None
        try:
            await runner.stop("shutdown" if reason == "shutdown" else f"unload ({reason})")
            if proxy is not None:
                await proxy.aclose()
            if pid is not None and slot.measured is not None and any(slot.measured.gpu_mib):
                # The driver frees a dead process's VRAM a little later: the next load's estimate must see it.
                await vram.after_exit(pid, self.cfg.vram_release_wait_s)
        finally:
            slot.runner, slot.proxy, slot.unloading, slot.draining = None, None, False, ""
            slot.last_unload = {"reason": reason, "detail": detail, "at": time.time()}
            if count:
                self.metrics.evictions.labels(slot.id, reason).inc()
            slot.notify()
            self.wake()

    async def after_oom(self, mid: str, on: frozenset[int] | None = None) -> bool:
        """Model `mid` ran out of memory (on GPUs `on`): unload idle others there so it can try the same settings
        again."""
        unloads = rs.after_oom(self.view(rs.Room()), mid, on)
        for u in unloads:
            await self._unload(self.slots[u.model], u.reason, u.detail)
        return bool(unloads)


class _Watch:
    """A runner observer: wakes the pool on every state change, and measures the child when it is ready."""

    def __init__(self, pool: Pool, slot: Slot) -> None:
        self.pool, self.slot = pool, slot

    def machine_changed(self, runner: Runner, old: Machine, new: Machine) -> None:
        if new.state is old.state:
            return
        if new.state is State.READY:
            self.pool._task(self.pool._measure(self.slot, runner, new.gen))
        self.pool.wake()

    def child_line(self, runner: Runner, gen: int, line: str) -> None:
        pass


class _BoxNotifier(Notifier):
    """systemd hears about the box from its default model only, and never STOPPING=1 or the states of an
    unload: evicting a model is not the service stopping (the daemon sends STOPPING=1 itself at shutdown).
    Which model is the default is read at each message: the settings file may name another one."""

    def __init__(self, pool: Pool, slot: Slot) -> None:
        super().__init__({})
        self.pool, self.slot = pool, slot
        self.address, self.watchdog_s = pool.notifier.address, pool.notifier.watchdog_s

    def send(self, *fields: str) -> bool:
        if self.slot.id != self.pool.default or self.slot.unloading or any(f == "STOPPING=1" for f in fields):
            return False
        return self.pool.notifier.send(*fields)

    def close(self) -> None:
        pass
