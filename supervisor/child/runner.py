"""The runner: owns the one lifecycle Machine and carries out its actions (processes, probes, timers).

Everything that happens is turned into an event and passed to `dispatch`, which applies the pure
transition function and then performs the returned actions. Nothing else changes lifecycle state, and
nothing outside the runner writes to it: the web side and /status read `view()` and the read-only
properties, and tell the runner things only through its methods.

One owner of the truth about the child: the instant a child's wait() returns, `ChildGone` takes the
machine out of `ready` and the upstream address goes with it, in one step; the classification and the
out-of-memory evidence follow as `ChildExited`. Every task that runs a child ends with both events,
whatever was raised inside it.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import httpx
import structlog

from ..config import Config
from ..core.command import CommandError, build_argv, child_env, redact
from ..core.crash import FATAL_WHILE_RUNNING, Cause, Verdict
from ..core.ladder import Evidence, RunSettings
from ..core.lifecycle import (
    Action,
    BackoffElapsed,
    ChildExited,
    ChildGone,
    Event,
    Finished,
    Healthy,
    Kill,
    Machine,
    Policy,
    Remember,
    RestartRequested,
    Retry,
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
from ..host import memory
from ..host.gguf import block_count
from ..loading import Loaded, base_settings, policy_for
from ..metrics import Metrics
from ..sdnotify import Notifier
from . import vram
from .climber import Climber
from .exits import examine
from .liveness import liveness
from .process import Child, oom_kill_count, spawn
from .readiness import NotReady, wait_healthy, warmup
from .view import ExitListener, Observer, RunnerView

log = structlog.get_logger("supervisor")
SETTLED = (State.READY, State.FAILED, State.STOPPING, State.STOPPED)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Runner:
    def __init__(self, cfg: Config, loaded: Loaded, *, metrics: Metrics | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier({})
        self._loaded = loaded
        self._memory = memory.SettingsMemory(cfg.state_dir)
        self._policy = policy_for(cfg, loaded.profile)
        self._machine: Machine = initial(base_settings(loaded.profile))
        self._child: Child | None = None
        self._child_gen = 0  # the generation `_child` belongs to
        self._child_url: str | None = None
        self._argv: list[str] = []
        self._last_tail: list[str] = []  # the last child's output, kept after it is gone
        self._model_layers: int | None = None
        self._last_estimate: dict[str, Any] | None = None
        self._load_s: float | None = None
        self._warmup: dict[str, Any] | None = None
        self._started_mono = time.monotonic()
        self._last_progress = 0.0  # monotonic time of the last sign of life from the child (traffic, probes)
        self._closing = False
        self._traffic: Callable[[], int] = lambda: 0  # requests in flight or waiting (the proxy counts them)
        self._exit_listeners: list[ExitListener] = []
        self._oom_hook: Callable[[], Awaitable[bool]] | None = None
        self.finished = asyncio.Event()
        self._settled = asyncio.Event()  # replaced on every state change: wakes everyone waiting for one
        self._observers: list[Observer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}  # one per kind: a new one replaces (cancels) the old
        # Awaited after a child's warmup, before it is reported ready (generation, warmup info): the proxy's
        # context guard learns the child's figures there. A hook handles its own errors.
        self._after_warmup: list[Callable[[int, dict[str, Any]], Awaitable[None]]] = []
        # Probes and warmup keep no idle connection: it would pin one of llama-server's HTTP threads (see proxy.py).
        self._http = httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0))
        self.climber = Climber(self)

    # ---- the read-only surface ---------------------------------------------------------------

    @property
    def machine(self) -> Machine:
        return self._machine

    @property
    def loaded(self) -> Loaded:
        return self._loaded

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def child(self) -> Child | None:
        return self._child

    @property
    def child_url(self) -> str | None:
        return self._child_url

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    @property
    def warmup(self) -> dict[str, Any] | None:
        return self._warmup

    @property
    def model_layers(self) -> int | None:
        return self._model_layers

    @property
    def ready(self) -> bool:
        return self._machine.state is State.READY

    @property
    def last_progress(self) -> float:
        return self._last_progress

    def view(self) -> RunnerView:
        child = self._child
        return RunnerView(
            machine=self._machine, loaded=self._loaded, child_pid=child.pid if child else None,
            child_started_at=child.started_at if child else None, child_url=self._child_url,
            argv=tuple(self._argv), log_tail=tuple(child.tail if child else self._last_tail),
            load_s=self._load_s, warmup=self._warmup, model_layers=self._model_layers,
            vram_estimate=self._last_estimate, climb=self.climber.status(), started_mono=self._started_mono)

    # ---- what the web side and the reloader tell the runner -----------------------------------

    def note_progress(self) -> None:
        """Bytes came from the child, or a request completed: proof of life for liveness."""
        self._last_progress = time.monotonic()

    def set_traffic(self, count: Callable[[], int]) -> None:
        """How many requests are in flight or waiting (climbing back waits for none)."""
        self._traffic = count

    def traffic(self) -> int:
        return self._traffic()

    def on_warmed(self, hook: Callable[[int, dict[str, Any]], Awaitable[None]]) -> None:
        """Awaited with (generation, warmup info) after a child's warmup, before it is reported ready."""
        self._after_warmup.append(hook)

    def on_oom(self, hook: Callable[[], Awaitable[bool]]) -> None:
        """Asked after an out-of-memory exit, before the ladder: True when it freed memory (the pool unloaded
        idle models), so the same settings are tried again."""
        self._oom_hook = hook

    def on_exit(self, listener: ExitListener) -> None:
        """Called with (generation, verdict, returncode) for every classified exit."""
        self._exit_listeners.append(listener)

    def observe(self, observer: Observer) -> None:
        """Told of every Machine change and every child log line (the ops page's timeline and log ring)."""
        self._observers.append(observer)

    # ---- the one place where lifecycle state changes ----------------------------------------

    def dispatch(self, ev: Event) -> None:
        old = self._machine
        self._machine, actions = transition(old, ev, self._policy)
        new = self._machine
        if new.state is not old.state or new.history[-1:] != old.history[-1:]:
            self._on_state_change(old, new)
        elif new.crash_loop != old.crash_loop:  # a child stayed up for stable_s: the loop is over
            self.metrics.set_state(new.state, crash_loop=new.crash_loop)
        if new is not old:
            for obs in self._observers:
                obs.machine_changed(self, old, new)
        for action in actions:
            self._perform(action)

    def _on_state_change(self, old: Machine, new: Machine) -> None:
        t = new.history[-1]
        log.info("state", **{"from": t.src.value, "to": t.dst.value}, cause=t.cause, detail=t.detail,
                 gen=new.gen)
        self.metrics.set_state(new.state, crash_loop=new.crash_loop)
        # Everyone waiting for a state (held requests, stop) looks again.
        self._settled.set()
        self._settled = asyncio.Event()
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
        # EXTEND_TIMEOUT_USEC is the keepalive's (server.py): only before the first READY=1, re-sent while loading.
        return fields

    def _perform(self, a: Action) -> None:
        match a:
            case Spawn(gen=gen, settings=settings):
                self._task(self._run_child(gen, settings))
            case Kill(gen=gen, reason=reason):
                self._task(self._kill(gen, reason))
            case Warmup(gen=gen):
                self._task(self._warmup_child(gen))
            case SetTimer(kind=kind, gen=gen, delay_s=delay):
                event = BackoffElapsed if kind == "backoff" else StableElapsed
                if kind == "backoff":
                    log.info("backoff", seconds=round(delay, 3), cause=self._machine.reason,
                             crash_loop=self._machine.crash_loop)
                if (old := self._timers.pop(kind, None)) is not None:
                    old.cancel()  # a new child's timer replaces the old child's: only one of each kind is pending

                def fire() -> None:
                    if self._timers.get(kind) is handle:
                        del self._timers[kind]
                    self.dispatch(event(time.monotonic(), gen))

                handle = asyncio.get_running_loop().call_later(delay, fire)
                self._timers[kind] = handle
            case Remember(settings=settings):
                self._task(asyncio.to_thread(self._remember, settings))
            case Finished():
                self.finished.set()

    def _task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal_error", error=repr(task.exception()), exc_info=task.exception())

    # ---- learned settings ---------------------------------------------------------------------

    def memory_key(self) -> str:
        """Blocking (stats the model and binary files): call from a worker thread. The key is the command
        line the profile asks for (port aside), so an edited profile never meets settings learned for another."""
        loaded = self._loaded
        identity = build_argv(loaded.profile, loaded.caps, base_settings(loaded.profile), 0)
        return memory.key_for(identity, loaded.profile.model, loaded.caps.binary)

    def _remember(self, settings: RunSettings) -> None:
        self._memory.save(self.memory_key(), settings, self._loaded.profile.name)

    def _recall(self) -> RunSettings | None:
        return self._memory.load(self.memory_key())

    def _forget(self) -> None:
        self._memory.forget(self.memory_key())

    # ---- starting ------------------------------------------------------------------------------

    async def start(self) -> None:
        p = self._loaded.profile
        learned = await asyncio.to_thread(self._recall)
        self._model_layers = await asyncio.to_thread(block_count, p.model)
        base = base_settings(p)
        first, why = learned, None
        if learned is not None and learned != base:
            log.info("learned_settings", settings=learned.as_dict(), profile=p.name)
            climbed = await self.climber.at_start(base, learned)
            if climbed is not None:
                first, why = climbed
        elif learned is None and self.cfg.estimate_vram:
            first, why, self._last_estimate = await vram.pre_launch(p, base, self._model_layers)
        self._machine = initial(base, first, why)
        self._task(liveness(self))
        self._task(self.climber.run())
        self.dispatch(Start(time.monotonic()))

    async def _run_child(self, gen: int, settings: RunSettings) -> None:
        """Start child `gen`, watch it, and end with ChildGone + ChildExited whatever happens in between."""
        child: Child | None = None
        verdict: Verdict | None = None
        rc: int | None = None
        evidence = Evidence(model_layers=self._model_layers)
        try:
            t0 = time.monotonic()
            oom_before = await asyncio.to_thread(oom_kill_count)
            child, verdict = await self._spawn_child(gen, settings)
            if child is not None:
                rc, verdict, evidence = await self._watch_child(gen, child, oom_before, t0)
        except asyncio.CancelledError:
            verdict = verdict or Verdict(Cause.STOPPED, "the supervisor is shutting down")
            raise
        except Exception as exc:  # whatever it was, the machine must hear that this child is over
            log.error("child_task_error", gen=gen, error=repr(exc), exc_info=exc)
            verdict = Verdict(Cause.INTERNAL, f"supervisor error while running llama-server: {exc!r}"[:500])
        finally:
            if child is not None and child.returncode is None:
                child.kill_now()  # never leave it behind: the kernel reaps it, the group goes with it
            self._gone(gen, child)
            self.dispatch(ChildExited(time.monotonic(), gen, verdict or Verdict(Cause.INTERNAL, "unknown exit"),
                                      rc, evidence, random.random()))
            for listener in self._exit_listeners:
                listener(gen, verdict or Verdict(Cause.INTERNAL, ""), rc)

    async def _spawn_child(self, gen: int, settings: RunSettings) -> tuple[Child | None, Verdict | None]:
        p = self._loaded.profile
        port = p.port or free_port()
        try:
            argv = build_argv(p, self._loaded.caps, settings, port)
        except CommandError as exc:
            return None, Verdict(Cause.BAD_ARGS, str(exc))
        cause = self._machine.history[-1].cause if self._machine.history else "start"
        log.info("child_spawn", gen=gen, cause=cause, settings=settings.as_dict(),
                 adjustment=self._machine.adjustment, argv=redact(argv))
        try:
            child = await spawn(argv, child_env(os.environ, p), on_line=partial(self._on_line, gen),
                                echo=self.cfg.log_child_output)
        except OSError as exc:
            return None, Verdict(Cause.SPAWN_FAILED, f"cannot start {argv[0]}: {exc.strerror or exc}")
        except (ValueError, TypeError) as exc:  # e.g. a NUL byte in an environment value
            return None, Verdict(Cause.BAD_ARGS, f"cannot start {argv[0]}: {exc}")
        self._child, self._child_gen, self._argv = child, gen, argv
        self._child_url, self._load_s = f"http://127.0.0.1:{port}", None
        if self._machine.gen == gen and self._machine.pending is not None:
            # A stop or restart was asked for while this child was being spawned: carry it out now.
            self._task(self._kill(gen, self._machine.kill_reason))
        return child, None

    async def _watch_child(self, gen: int, child: Child, oom_before: int | None, t0: float
                           ) -> tuple[int, Verdict, Evidence]:
        health = asyncio.create_task(self._await_health(gen, child, t0))
        try:
            rc = await child.wait()
        finally:
            health.cancel()
        self._gone(gen, child)  # from this instant nothing is sent to it; the examination follows
        verdict, ev = await examine(child, rc, oom_before, gen, profile=self._loaded.profile,
                                    ctx_size=self._machine.effective.ctx_size, model_layers=self._model_layers,
                                    release_wait_s=self.cfg.vram_release_wait_s, metrics=self.metrics,
                                    free_others=self._oom_hook)
        return rc, verdict, ev

    def _gone(self, gen: int, child: Child | None) -> None:
        """The child of `gen` is gone: drop its address and tell the machine, in one step (no await)."""
        if child is not None and self._child is child:
            self._last_tail = list(child.tail)
            self._child, self._child_url = None, None
        if self._machine.gen == gen and self._machine.child_alive:
            self.dispatch(ChildGone(time.monotonic(), gen))

    async def _await_health(self, gen: int, child: Child, t0: float) -> None:
        try:
            await wait_healthy(self._http, self._child_url or "", child, stall_s=self.cfg.load_stall_s,
                               max_s=self.cfg.load_max_s)
        except NotReady as exc:
            if child.returncode is None:
                self.dispatch(Unresponsive(time.monotonic(), gen, f"load: {exc}"))
            return
        self._load_s = time.monotonic() - t0
        self.metrics.load_seconds.set(self._load_s)
        self.dispatch(Healthy(time.monotonic(), gen))

    async def _warmup_child(self, gen: int) -> None:
        p = self._loaded.profile
        if not p.warmup:
            self._warmup = {"skipped": True}
            await self._warmed(gen)
            return
        try:
            info = await warmup(self._http, self._child_url or "", image=p.images if p.mmproj is not None else None,
                                timeout_s=self.cfg.warmup_timeout_s)
        except NotReady as exc:
            self.dispatch(Unresponsive(time.monotonic(), gen, f"warmup: {exc}"))
            return
        self._warmup = info
        self.metrics.warmup_seconds.set(float(info["seconds"]))  # type: ignore[arg-type]
        eff = self._machine.effective
        self.metrics.gpu_layers.set(eff.n_gpu_layers if isinstance(eff.n_gpu_layers, int) else -1)
        self.metrics.ctx_size.set(eff.ctx_size)
        self.note_progress()
        await self._warmed(gen)

    async def _warmed(self, gen: int) -> None:
        for hook in self._after_warmup:
            await hook(gen, self._warmup or {})
        self.dispatch(WarmedUp(time.monotonic(), gen))

    async def _kill(self, gen: int, reason: str) -> None:
        child = self._child
        if child is None or self._child_gen != gen:
            return  # not spawned yet: _spawn_child sees machine.pending and comes back here
        log.info("child_stop", gen=gen, pid=child.pid, reason=reason)
        timeout = 2.0 if self._machine.pending is Cause.WEDGED else self.cfg.stop_timeout_s
        await child.stop(timeout)

    def _on_line(self, gen: int, line: str) -> None:
        for obs in self._observers:
            obs.child_line(self, gen, line)
        if FATAL_WHILE_RUNNING.search(line) and self._machine.gen == gen:
            self.dispatch(Unresponsive(time.monotonic(), gen, f"fatal log line: {line.strip()[:300]}"))

    # ---- used by the API, the proxy and the reloader ---------------------------------------------

    async def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) for ready; False at once when the state settles elsewhere (failed, stopping)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self._machine.state
            if state is State.READY:
                return True
            if state in SETTLED:
                return False
            left = deadline - time.monotonic()
            m = self._machine
            if left <= 0 or (m.crash_loop and m.retry_at is not None and m.retry_at - time.monotonic() > left):
                return False  # out of time, or a crash loop's next try comes later than the caller can wait
            try:
                await asyncio.wait_for(self._settled.wait(), left)
            except TimeoutError:
                return False

    def restart(self, reason: str, *, reset: bool = False, base: RunSettings | None = None) -> None:
        if self._closing:
            log.info("restart_ignored", reason=reason, why="shutting down")
            return
        if reset:
            self._task(asyncio.to_thread(self._forget))
        self.dispatch(RestartRequested(time.monotonic(), reason, base=base, reset=reset))

    def retry_failed(self, reason: str) -> bool:
        """A file the failed start depended on changed: try again (only from `failed`)."""
        if self._closing or self._machine.state is not State.FAILED:
            return False
        self.dispatch(Retry(time.monotonic(), reason))
        return True

    def apply_profile(self, loaded: Loaded) -> None:
        """A valid profile whose command line is unchanged: supervisor-side settings (images, warmup, the
        ladder's floor) apply at once, without a restart."""
        self._loaded = loaded
        self._policy = policy_for(self.cfg, loaded.profile)

    def replace_profile(self, loaded: Loaded) -> None:
        """Switch to a new (validated) profile; the caller decided that the child must restart."""
        if self._closing:
            log.info("reload_ignored", file=str(loaded.path), why="shutting down")
            return
        self.apply_profile(loaded)
        self.restart(f"profile changed: {loaded.path}", base=base_settings(loaded.profile))

    @property
    def closing(self) -> bool:
        return self._closing

    def shutting_down(self) -> None:
        """From now on no reload, restart or retry starts a child (a late SIGHUP included)."""
        self._closing = True

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after stop_timeout_s) and every task; bounded."""
        self._closing = True
        self.dispatch(StopRequested(time.monotonic()))
        try:
            await asyncio.wait_for(self.finished.wait(), self.cfg.stop_timeout_s + 5.0)
        except TimeoutError:
            log.error("stop_timeout", state=self._machine.state.value, pid=self._child.pid if self._child else None)
            if self._child is not None:
                self._child.kill_now()
        for t in self._timers.values():
            t.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()
