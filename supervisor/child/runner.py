"""The runner: owns the one lifecycle Machine and carries out its actions (processes, probes, timers).

Everything that happens is turned into an event and passed to `dispatch`, which applies the pure
transition function and then performs the returned actions. Nothing else changes lifecycle state.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import structlog

from ..config import Config
from ..core import estimate
from ..core.command import CommandError, build_argv, child_env, redact
from ..core.crash import FATAL_WHILE_RUNNING, OOM_CAUSES, Cause, Exit, Verdict, classify
from ..core.ladder import Evidence, RunSettings
from ..core.lifecycle import (
    Action,
    BackoffElapsed,
    ChildExited,
    Event,
    Finished,
    Healthy,
    Kill,
    Machine,
    Remember,
    RestartRequested,
    SetTimer,
    Spawn,
    StableElapsed,
    Start,
    State,
    StopRequested,
    Unresponsive,
    WarmedUp,
    Warmup,
    initial,
    transition,
)
from ..host import gpu, memory
from ..host.gguf import block_count, footprint
from ..loading import Loaded, base_settings, policy_for
from ..metrics import Metrics
from ..sdnotify import Notifier
from .process import Child, oom_kill_count, spawn
from .readiness import NotReady, wait_healthy, warmup

log = structlog.get_logger("supervisor")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Runner:
    def __init__(self, cfg: Config, loaded: Loaded, *, metrics: Metrics | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.loaded = loaded
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier({})
        self.memory = memory.SettingsMemory(cfg.state_dir)
        self.policy = policy_for(cfg, loaded.profile)
        self.machine: Machine = initial(base_settings(loaded.profile))
        self.child: Child | None = None
        self.child_gen = 0  # the generation `child` belongs to
        self.child_url: str | None = None
        self.argv: list[str] = []
        self.last_tail: list[str] = []  # the last child's output, kept after it is gone
        self.model_layers: int | None = None
        self.last_estimate: dict[str, Any] | None = None
        self.load_s: float | None = None
        self.warmup: dict[str, Any] | None = None
        self.started_mono = time.monotonic()
        self.in_flight = 0
        self.waiting = 0
        self.last_success = 0.0  # monotonic time of the last proxied 2xx, proof of life for liveness
        self.last_reload_error: dict[str, Any] | None = None
        self.finished = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()  # pending only: a timer removes itself when it fires
        # Awaited after a child's warmup, before it is reported ready (generation, warmup info): the proxy's
        # context guard learns the child's figures there. A hook handles its own errors.
        self.after_warmup: list[Callable[[int, dict[str, Any]], Awaitable[None]]] = []
        # Probes and warmup keep no idle connection: it would pin one of llama-server's HTTP threads (see proxy.py).
        self.http = httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0))

    # ---- the one place where lifecycle state changes ----------------------------------------

    def dispatch(self, ev: Event) -> None:
        old = self.machine
        self.machine, actions = transition(old, ev, self.policy)
        if self.machine.state is not old.state:
            self._on_state_change(old, self.machine)
        for action in actions:
            self._perform(action)

    def _on_state_change(self, old: Machine, new: Machine) -> None:
        t = new.history[-1]
        log.info("state", **{"from": t.src.value, "to": t.dst.value}, cause=t.cause, detail=t.detail,
                 gen=new.gen)
        self.metrics.set_state(new.state)
        if new.state is State.READY:
            self._ready.set()
        else:
            self._ready.clear()
        self.notifier.send(*self._notify_fields(new))

    def _notify_fields(self, m: Machine) -> list[str]:
        words = {State.STARTING: "loading model", State.WARMING: "warming up", State.READY: "ready",
                 State.BACKOFF: f"backoff: {m.reason}", State.FAILED: f"failed: {m.reason}",
                 State.STOPPING: "stopping", State.STOPPED: "stopped"}
        fields = [f"STATUS={words[m.state]}"[:400]]
        if m.state is State.READY:
            fields.insert(0, "READY=1")
        elif m.state is State.STOPPING:
            fields.insert(0, "STOPPING=1")
        elif m.state is State.STARTING and self.notifier.enabled:
            # Tell systemd a model load may take a while, so the start timeout does not fire.
            fields.append(f"EXTEND_TIMEOUT_USEC={int(self.cfg.load_stall_s * 2e6)}")
        return fields

    def _perform(self, a: Action) -> None:
        match a:
            case Spawn(gen=gen, settings=settings):
                self._task(self._run_child(gen, settings))
            case Kill(gen=gen, reason=reason):
                self._task(self._kill(gen, reason))
            case Warmup(gen=gen):
                self._task(self._warmup(gen))
            case SetTimer(kind=kind, gen=gen, delay_s=delay):
                event = BackoffElapsed if kind == "backoff" else StableElapsed
                if kind == "backoff":
                    log.info("backoff", seconds=round(delay, 3), cause=self.machine.reason)

                def fire() -> None:
                    self._timers.discard(handle)
                    self.dispatch(event(time.monotonic(), gen))

                handle = asyncio.get_running_loop().call_later(delay, fire)
                self._timers.add(handle)
            case Remember(settings=settings):
                self._task(asyncio.to_thread(self._remember, settings))
            case Finished():
                self.finished.set()

    def _task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal_error", error=repr(task.exception()), exc_info=task.exception())

    # ---- effects ----------------------------------------------------------------------------

    def memory_key(self) -> str:
        """Blocking (stats the model and binary files): call from a worker thread."""
        p = self.loaded.profile
        return memory.key_for(p.name, p.model, self.loaded.caps.binary)

    def _remember(self, settings: RunSettings) -> None:
        self.memory.save(self.memory_key(), settings, self.loaded.profile.name)

    def _recall(self) -> RunSettings | None:
        return self.memory.load(self.memory_key())

    def _forget(self) -> None:
        self.memory.forget(self.memory_key())

    async def start(self) -> None:
        p = self.loaded.profile
        learned = await asyncio.to_thread(self._recall)
        self.model_layers = await asyncio.to_thread(block_count, p.model)
        base = base_settings(p)
        first, why = learned, None
        if learned is not None and learned != base:
            log.info("learned_settings", settings=learned.as_dict(), profile=p.name)
        elif learned is None and self.cfg.estimate_vram:
            first, why = await self._pre_launch_estimate(base)
        self.machine = initial(base, first, why)
        self._task(self._liveness())
        self.dispatch(Start(time.monotonic()))

    async def _footprint(self, ctx_size: int) -> estimate.Footprint | None:
        p = self.loaded.profile
        try:
            return await asyncio.to_thread(footprint, p.model, ctx_size, p.cache_type_k, p.cache_type_v,
                                           p.mmproj)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("footprint_unavailable", error=repr(exc))
            return None

    async def _pre_launch_estimate(self, base: RunSettings) -> tuple[RunSettings | None, str | None]:
        """An explicit layer count that clearly does not fit free VRAM starts at the estimate instead."""
        if self.model_layers is None or base.n_gpu_layers == "auto":
            return None, None
        asked = estimate.requested_offload(base.n_gpu_layers, self.model_layers)
        if not asked:
            return None, None
        gpus = await asyncio.to_thread(gpu.snapshot)
        fp = await self._footprint(base.ctx_size) if gpus else None
        if not gpus or fp is None:
            return None, None
        est = estimate.fit_layers(fp, gpus[0].memory_free_mib)
        self.last_estimate = {"asked": asked, "layers": est.layers, "free_mib": round(est.free_mib),
                              "describe": est.describe()}
        log.info("vram_estimate", asked=asked, fits=est.layers, detail=est.describe())
        if est.layers >= asked:
            return None, None
        why = f"pre-launch estimate: {est.describe()}; the profile asks for {asked}"
        return RunSettings(est.layers, base.ctx_size), why

    async def _run_child(self, gen: int, settings: RunSettings) -> None:
        p = self.loaded.profile
        port = p.port or free_port()
        try:
            argv = build_argv(p, self.loaded.caps, settings, port)
        except CommandError as exc:
            self.dispatch(ChildExited(time.monotonic(), gen, Verdict(Cause.BAD_ARGS, str(exc))))
            return
        cause = self.machine.history[-1].cause if self.machine.history else "start"
        log.info("child_spawn", gen=gen, cause=cause, settings=settings.as_dict(),
                 adjustment=self.machine.adjustment, argv=redact(argv))
        oom_before = await asyncio.to_thread(oom_kill_count)
        t0 = time.monotonic()
        try:
            child = await spawn(argv, child_env(os.environ, p), on_line=partial(self._on_line, gen),
                                echo=self.cfg.log_child_output)
        except OSError as exc:
            detail = f"cannot start {argv[0]}: {exc.strerror or exc}"
            self.dispatch(ChildExited(time.monotonic(), gen, Verdict(Cause.SPAWN_FAILED, detail)))
            return
        self.child, self.child_gen, self.argv, self.child_url = child, gen, argv, f"http://127.0.0.1:{port}"
        self.load_s = None
        if self.machine.gen == gen and self.machine.pending is not None:
            # A stop or restart was asked for while this child was being spawned: carry it out now.
            self._task(self._kill(gen, self.machine.reason))
        health = asyncio.create_task(self._await_health(gen, child, t0))
        rc = await child.wait()
        health.cancel()
        oom_after = await asyncio.to_thread(oom_kill_count)
        oom_killed = None if oom_before is None or oom_after is None else oom_after > oom_before
        verdict = classify(Exit(rc, tuple(child.tail)[-80:], child.signalled, oom_killed))
        free, fp = None, None
        if verdict.cause in OOM_CAUSES:
            free = await self._vram_after_exit(child.pid)
            if free is not None:
                fp = await self._footprint(self.machine.effective.ctx_size)
        self.last_tail = list(child.tail)
        if self.child is child:
            self.child, self.child_url = None, None
        if verdict.cause is not Cause.STOPPED:
            self.metrics.restarts.labels(verdict.cause.value).inc()
            log.warning("child_exit", gen=gen, pid=child.pid, returncode=rc, cause=verdict.cause.value,
                        detail=verdict.detail)
        else:
            log.info("child_exit", gen=gen, pid=child.pid, returncode=rc, cause=verdict.cause.value)
        ev = Evidence(alloc_mib=verdict.alloc_mib, free_vram_mib=free, model_layers=self.model_layers, footprint=fp,
                      compute=verdict.cause is Cause.OOM_COMPUTE)
        self.dispatch(ChildExited(time.monotonic(), gen, verdict, rc, ev, random.random()))

    async def _vram_after_exit(self, pid: int) -> float | None:
        """Drivers release VRAM a little after the process is gone: wait for it (bounded), then read free VRAM."""
        deadline = time.monotonic() + self.cfg.vram_release_wait_s
        while True:
            gpus = await asyncio.to_thread(gpu.snapshot)
            if not gpus:
                return None
            still = any(proc_pid == pid for g in gpus for proc_pid, _ in g.processes)
            if not still or time.monotonic() > deadline:
                return gpus[0].memory_free_mib
            await asyncio.sleep(0.2)

    async def _await_health(self, gen: int, child: Child, t0: float) -> None:
        try:
            await wait_healthy(self.http, self.child_url or "", child, stall_s=self.cfg.load_stall_s,
                               max_s=self.cfg.load_max_s)
        except NotReady as exc:
            if child.returncode is None:
                self.dispatch(Unresponsive(time.monotonic(), gen, f"load: {exc}"))
            return
        self.load_s = time.monotonic() - t0
        self.metrics.load_seconds.set(self.load_s)
        self.dispatch(Healthy(time.monotonic(), gen))

    async def _warmup(self, gen: int) -> None:
        p = self.loaded.profile
        if not p.warmup:
            self.warmup = {"skipped": True}
            await self._warmed(gen)
            return
        try:
            info = await warmup(self.http, self.child_url or "", image=p.images if p.mmproj is not None else None,
                                timeout_s=self.cfg.warmup_timeout_s)
        except NotReady as exc:
            self.dispatch(Unresponsive(time.monotonic(), gen, f"warmup: {exc}"))
            return
        self.warmup = info
        self.metrics.warmup_seconds.set(float(info["seconds"]))  # type: ignore[arg-type]
        eff = self.machine.effective
        self.metrics.gpu_layers.set(eff.n_gpu_layers if isinstance(eff.n_gpu_layers, int) else -1)
        self.metrics.ctx_size.set(eff.ctx_size)
        await self._warmed(gen)

    async def _warmed(self, gen: int) -> None:
        for hook in self.after_warmup:
            await hook(gen, self.warmup or {})
        self.dispatch(WarmedUp(time.monotonic(), gen))

    async def _kill(self, gen: int, reason: str) -> None:
        child = self.child
        if child is None or self.child_gen != gen:
            return  # not spawned yet: _run_child sees machine.pending and comes back here
        log.info("child_stop", gen=gen, pid=child.pid, reason=reason)
        timeout = 2.0 if self.machine.pending is Cause.WEDGED else self.cfg.stop_timeout_s
        await child.stop(timeout)

    def _on_line(self, gen: int, line: str) -> None:
        if FATAL_WHILE_RUNNING.search(line) and self.machine.gen == gen:
            self.dispatch(Unresponsive(time.monotonic(), gen, f"fatal log line: {line.strip()[:300]}"))

    async def _liveness(self) -> None:
        failures, gen = 0, -1
        while True:
            await asyncio.sleep(self.cfg.liveness_interval_s)
            m = self.machine
            if m.state is not State.READY or self.child_url is None:
                failures = 0
                continue
            if m.gen != gen:
                failures, gen = 0, m.gen
            if time.monotonic() - self.last_success < self.cfg.liveness_interval_s:
                failures = 0  # real traffic just succeeded: it is alive
                continue
            try:
                r = await self.http.get(f"{self.child_url}/health", timeout=self.cfg.liveness_timeout_s)
                ok = r.status_code == 200
                why = f"/health answered {r.status_code}"
            except httpx.HTTPError as exc:
                ok, why = False, f"/health: {type(exc).__name__}"
            failures = 0 if ok else failures + 1
            if failures >= self.cfg.liveness_failures and self.machine.gen == gen:
                self.dispatch(Unresponsive(time.monotonic(), gen, f"liveness: {failures} failed probes ({why})"))
                failures = 0

    # ---- used by the API and the proxy --------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.machine.state is State.READY

    async def wait_ready(self, timeout: float) -> bool:
        if self.ready:
            return True
        if self.machine.state in (State.FAILED, State.STOPPING, State.STOPPED):
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return self.ready

    def restart(self, reason: str, *, reset: bool = False, base: RunSettings | None = None) -> None:
        if reset:
            self._task(asyncio.to_thread(self._forget))
        self.dispatch(RestartRequested(time.monotonic(), reason, base=base, reset=reset))

    def replace_profile(self, loaded: Loaded) -> None:
        """Switch to a new (validated) profile; the caller decided that the child must restart."""
        self.loaded = loaded
        self.policy = policy_for(self.cfg, loaded.profile)
        self.restart(f"profile changed: {loaded.path}", base=base_settings(loaded.profile))

    async def stop(self) -> None:
        self.dispatch(StopRequested(time.monotonic()))
        await self.finished.wait()
        for t in self._timers:
            t.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()
