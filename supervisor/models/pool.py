"""The pool: the one owner of which models are loaded, on every box (one profile is a pool of one model).

Requests ask `acquire(model, deadline)`: a loaded, ready model is admitted at once; otherwise the request waits
(one wait, one counter, one deadline) for its model to be loaded — the pool loop decides (core/residency.py)
what to load, unload, drain or refuse, one step at a time, since unloading and loading change the memory the
next decision reads — and for its child to be ready. What a model needs is its measured VRAM and RSS once it
was ready, the GGUF estimate before. Each model keeps one runner for its whole life in the catalog.
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
from ..core.lifecycle import State
from ..host import room
from ..host.sdnotify import Notifier
from ..spec.loaded import Loaded
from ..spec.settings import Config
from ..telemetry.metrics import BoxMetrics
from .catalog import Catalog
from .hooks import BoxNotifier, Watch
from .model import Model

log = structlog.get_logger("pool")


class Unavailable(Exception):
    """A request the pool cannot serve now: the proxy answers 503 with Retry-After."""


class Pool:
    def __init__(self, cfg: Config, catalog: Catalog, default: str, *, notifier: Notifier | None = None,
                 metrics: BoxMetrics | None = None) -> None:
        self.cfg = cfg
        self.default = default
        self.notifier = notifier or Notifier({})
        self.metrics = metrics or BoxMetrics()
        self.rules = rs.Rules(pass_over_s=cfg.swap_pass_over_s, wait_s=cfg.queue_wait_s)
        self.models: dict[str, Model] = {}
        self.names: dict[str, str] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.waiting_on: dict[str, list[str]] = {}
        # told of every model made after this (the web side, the page), which see the ones there now themselves
        self.on_model: list[Callable[[Model], None]] = []
        self.on_forget: list[Callable[[Model], Any]] = []  # ... and of every model removed (awaited if a coroutine)
        # told of every swap step as (model, action, cause, detail): load, drain, unload, refuse (the ops page)
        self.on_swap: list[Callable[[str, str, str, str], None]] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.last_room: rs.Room | None = None
        self.set_catalog(catalog)

    # ---- the catalog ------------------------------------------------------------------------

    def set_catalog(self, catalog: Catalog) -> None:
        """New ids get a model (and its runner); what is gone is the reloader's to remove (remove())."""
        for mid, loaded in catalog.models.items():
            if mid not in self.models:
                self._make(mid, loaded)
        self.names = catalog.names()
        self.errors, self.waiting_on = catalog.errors, catalog.waiting_on

    def _make(self, mid: str, loaded: Loaded) -> Model:
        metrics = self.metrics.for_model(mid)

        def speaks() -> bool:  # the default speaks for the box; its unload does not, but the shutdown does
            model = self.models.get(mid)
            return mid == self.default and model is not None and (self.stopping or not model.unloading)

        runner = Runner(self.cfg, loaded, metrics=metrics, notifier=BoxNotifier(self.notifier, speaks))
        model = self.models[mid] = Model(mid, loaded, metrics, runner)
        runner.observe(Watch(model, self.wake, self.task))
        runner.on_oom(lambda on: self.after_oom(mid, on))
        for hook in self.on_model:
            hook(model)
        return model

    def resolve(self, requested: str | None) -> str | None:
        """The model a request names. With exactly one model any name goes to it: OpenAI clients always send
        one, whatever they were configured with."""
        return resolve(requested, self.names, self.default, strict=len(self.models) > 1)

    @property
    def ids(self) -> list[str]:
        return list(self.models)

    def runners(self) -> list[Runner]:
        return [m.runner for m in self.models.values()]

    def in_flight(self) -> int:
        return sum(m.in_flight for m in self.models.values())

    # ---- starting and stopping --------------------------------------------------------------

    async def start(self) -> None:
        for model in self.models.values():
            await model.reckon()
        now = time.monotonic()
        # The default first (the oldest demand is served first), then pinned and preloaded models.
        default = self.models[self.default]
        default.wanted_since, default.wanted_by = now - 1.0, "start"
        for model in self.models.values():
            p = model.loaded.profile
            if model.id != self.default and (p.pinned or p.preload):
                model.wanted_since, model.wanted_by = now, "pinned" if p.pinned else "preload"
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
        await asyncio.gather(*(self._unload(m, "shutdown", "shutdown", count=False) for m in self.models.values()),
                             return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for model in self.models.values():
            await model.runner.aclose()
            await self._forget(model)

    def wake(self) -> None:
        self._wake.set()
    # ---- requests ----------------------------------------------------------------------------

    async def acquire(self, mid: str, deadline: float) -> Model:
        """Admit a request for model `mid` once it is loaded and its child ready, loading it (and making room)
        first if needed, until `deadline` (monotonic). Raises Unavailable."""
        model = self.models[mid]
        if model.admitting and model.runner.ready:
            model.admit()
            return model
        if model.waiting >= self.cfg.queue_max:
            raise Unavailable(f"model '{mid}' is {model.state_word()} and {model.waiting} requests are already "
                              "waiting for it (queue_max)")
        t0 = time.monotonic()
        model.start_waiting()
        rejected_before = model.rejected[0]
        self.wake()
        try:
            while True:
                if model.rejected[0] != rejected_before:
                    raise Unavailable(model.rejected[1])
                if self.models.get(mid) is not model:
                    raise Unavailable(f"model '{mid}' was removed")
                left = deadline - time.monotonic()
                if model.admitting:
                    if model.runner.ready:
                        model.admit()
                        return model
                    if left > 0 and await model.runner.wait_ready(left):
                        continue  # ready: admitted above unless it started going meanwhile
                    if model.admitting and not model.runner.ready:
                        m = model.runner.machine
                        raise Unavailable(f"llama-server is not ready ({m.state.value}"
                                          f"{': ' + m.reason if m.reason else ''})")
                    continue
                if left <= 0:
                    raise Unavailable(f"model '{mid}' was not loaded within {self.cfg.queue_wait_s:g}s"
                                      + (f": {model.waiting_why}" if model.waiting_why else ""))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(model.changed.wait(), left)
        finally:
            model.stop_waiting(t0)

    def release(self, model: Model) -> None:
        """Only a drain or a model waiting for room waits on one going idle (a TTL is polled): no step per request."""
        model.done()
        if model.in_flight == 0 and (model.draining or any(m.waiting or m.wanted_since for m in self.models.values())):
            self.wake()

    # ---- operator actions and reloads ------------------------------------------------------------

    def set_default(self, mid: str) -> None:
        """The settings file names another default: requests without a model and /health follow it now."""
        log.info("default_model", old=self.default, new=mid)
        self.default = mid
        self.request_load(mid, "start")

    def request_load(self, mid: str, cause: str = "admin") -> None:
        """Load `mid` (or keep it: a drain is called off; a failed start is tried again). Once an unload under
        way is done, the wish loads it again."""
        model = self.models[mid]
        if model.resident and model.runner.machine.state is State.FAILED:
            model.runner.retry_failed(f"{cause} load request")
        elif (not model.resident or model.unloading) and model.wanted_since is None:
            model.wanted_since, model.wanted_by = time.monotonic(), cause
        if not model.unloading:
            model.draining = ""
        self.wake()

    def retry_failed(self, mid: str, changed: str) -> None:
        """A file a failed model's start depends on changed: try it again."""
        model = self.models.get(mid)
        if model is not None and model.resident and model.runner.machine.state is State.FAILED:
            log.info("retry_failed_model", model=mid, changed=changed)
            self.request_load(mid, "file change")

    async def unload(self, mid: str, reason: str, detail: str) -> None:
        """Unload now, whatever the model's state (a removed profile): requests in flight are cut."""
        await self._unload(self.models[mid], reason, detail)

    def request_unload(self, mid: str, reason: str = "admin") -> bool:
        """Drain `mid` and unload it once idle. False when there is nothing to unload."""
        model = self.models[mid]
        model.wanted_since = None
        if not model.resident or model.unloading:
            return False
        model.draining = reason
        self._tell(mid, "drain", reason, "operator request: unloads once idle")
        self.wake()
        return True

    async def update(self, mid: str, loaded: Loaded) -> None:
        """An edit that leaves the child's command line as it is: supervisor-side settings apply at once."""
        model = self.models[mid]
        model.loaded = loaded
        model.runner.apply_profile(loaded)

    async def replace(self, mid: str, loaded: Loaded, drain_s: float) -> None:
        """An edit that changes the child: hold new requests, let those in flight finish (bounded), restart."""
        model = self.models[mid]
        model.loaded, model.measured = loaded, None  # new settings: measure again
        await model.reckon()
        if not model.resident:
            model.runner.apply_profile(loaded)
            return
        deadline = time.monotonic() + drain_s
        model.holding = True
        try:
            while model.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            model.runner.replace_profile(loaded)
        finally:
            model.holding = False
            model.notify()

    async def add(self, mid: str) -> None:
        """A model a reload added: its estimate, and a load if it is pinned or preloaded."""
        model = self.models[mid]
        await model.reckon()
        p = model.loaded.profile
        if p.pinned or p.preload:
            self.request_load(mid, "pinned" if p.pinned else "preload")

    async def remove(self, mid: str) -> None:
        """A profile file is gone: drain its model (requests in flight finish, bounded by drain_s), unload it,
        forget it. Residency unloads only a ready model: one failed or still starting is unloaded here."""
        model = self.models[mid]
        if model.resident and model.runner.ready and self.request_unload(mid, "reload"):
            deadline = time.monotonic() + self.cfg.drain_s + self.cfg.stop_timeout_s
            while model.resident and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(model.changed.wait(), deadline - time.monotonic())
        if model.resident:
            await self._unload(model, "reload", "profile removed")
        self.models.pop(mid)
        model.notify()  # its waiting requests learn it is gone
        await model.runner.aclose()
        await self._forget(model)

    async def _forget(self, model: Model) -> None:  # the web side closes the model's proxy
        for hook in self.on_forget:
            with contextlib.suppress(Exception):
                result = hook(model)
                if asyncio.iscoroutine(result):
                    await result

    # ---- the loop ----------------------------------------------------------------------------

    def view(self, r: rs.Room) -> rs.View:
        demands = []
        for m in self.models.values():
            if m.resident and not m.unloading:
                continue  # requests waiting for a loaded model's child are not a load demand
            if m.waiting:
                demands.append(rs.Demand(m.id, m.waiting, m.since or time.monotonic()))
            elif m.wanted_since is not None:
                demands.append(rs.Demand(m.id, 0, m.wanted_since))
        return rs.View(tuple(m.as_model() for m in self.models.values()), r, tuple(demands))

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._step()
            except Exception as exc:  # the pool must go on deciding whatever one step did
                log.error("pool_error", error=repr(exc), exc_info=exc)
            busy = any(m.waiting or m.wanted_since is not None or m.draining or m.loaded.profile.ttl_s
                       for m in self.models.values())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5 if busy else None)

    async def _step(self) -> None:
        if self.stopping:
            return
        pending = any((m.waiting and not m.resident) or m.wanted_since is not None for m in self.models.values())
        r = await asyncio.to_thread(room.room, self.cfg.memory_budget_mib) if pending else rs.Room()
        self.last_room = r if pending else self.last_room
        for action in rs.decide(self.view(r), self.rules, time.monotonic()):
            await self._perform(action)

    async def _perform(self, a: rs.Action) -> None:
        match a:
            case rs.Load(model=mid, plan=plan):
                await self._load(self.models[mid], plan)
            case rs.Unload(model=mid, reason=reason, detail=detail):
                await self._unload(self.models[mid], reason, detail)
            case rs.Drain(model=mid, reason=reason, detail=detail):
                model = self.models[mid]
                if not model.draining:
                    log.info("model_drain", model=mid, reason=reason, detail=detail)
                    model.draining = reason
                    self._tell(mid, "drain", reason, detail)
            case rs.Wait(model=mid, detail=detail):
                model = self.models[mid]
                if model.waiting_why != detail:
                    log.info("model_wait", model=mid, detail=detail)
                model.waiting_why = detail
            case rs.Reject(model=mid, detail=detail):
                gone = self.models.get(mid)
                if gone is not None:
                    log.warning("model_reject", model=mid, waiting=gone.waiting, detail=detail)
                    self._tell(mid, "refuse", "no room", detail)
                    gone.rejected = (gone.rejected[0] + 1, detail)
                    gone.wanted_since = None
                    gone.since = time.monotonic() if gone.waiting else None
                    gone.notify()

    async def _load(self, model: Model, plan: rs.Plan | None = None) -> None:
        cause = "request" if model.waiting else (model.wanted_by or "admin")
        log.info("model_load", model=model.id, cause=cause, waiting=model.waiting,
                 need=(model.measured or model.estimate).__dict__, measured=model.measured is not None)
        self._tell(model.id, "load", cause, f"{model.waiting} request(s) waiting" if model.waiting else "")
        model.wanted_since, model.wanted_by, model.draining, model.waiting_why = None, "", "", ""
        model.loads += 1
        self.metrics.swaps.labels(model.id, cause).inc()
        await model.runner.start(plan)  # where residency made the room (several GPUs)
        # Admitted only now: before start() its machine is `stopped`, which a waiting request takes for an end.
        model.resident = True
        model.last_used = time.monotonic()
        model.notify()  # the waiting group goes in together

    def _tell(self, mid: str, action: str, cause: str, detail: str) -> None:
        for hook in self.on_swap:
            try:  # an observer's bug must not stop a swap half-way
                hook(mid, action, cause, detail)
            except Exception as exc:  # noqa: BLE001
                log.error("swap_observer_error", error=repr(exc))

    def task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload(self, model: Model, reason: str, detail: str, *, count: bool = True) -> None:
        if not model.resident or model.unloading:
            return
        runner = model.runner
        log.info("model_unload", model=model.id, reason=reason, detail=detail, in_flight=model.in_flight)
        model.unloading = True
        self._tell(model.id, "unload", reason, detail)
        pid = runner.child.pid if runner.child is not None else None
        try:
            await runner.stop("shutdown" if reason == "shutdown" else f"unload ({reason})")
            if pid is not None and model.measured is not None and any(model.measured.gpu_mib):
                # The driver frees a dead process's VRAM a little later: the next load's estimate must see it.
                await vram.after_exit(pid, self.cfg.vram_release_wait_s)
        finally:
            model.resident, model.unloading, model.draining = False, False, ""
            model.last_unload = {"reason": reason, "detail": detail, "at": time.time()}
            if count:
                self.metrics.evictions.labels(model.id, reason).inc()
            model.notify()
            self.wake()

    async def after_oom(self, mid: str, on: frozenset[int] | None = None) -> bool:
        """Model `mid` ran out of memory (on GPUs `on`): unload idle others there, to try the same settings again."""
        unloads = rs.after_oom(self.view(rs.Room()), mid, on)
        for u in unloads:
            await self._unload(self.models[u.model], u.reason, u.detail)
        return bool(unloads)
