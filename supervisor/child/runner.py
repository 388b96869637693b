"""The runner: owns the one lifecycle Machine and hands its actions to whoever carries them out.

Everything that happens is turned into an event and passed to `dispatch`, which applies the pure
transition function and then performs the returned actions: the child's own (spawn, warmup, stop) go to
child/driver.py, timers and learned settings are handled here. Nothing else changes lifecycle state, and
nothing outside the runner writes to it: the web side and /status read `view()` and the read-only
properties, and tell the runner things only through its methods.

Elsewhere: what an exit was (child/exits.py), liveness probes (child/liveness.py), climbing back after the
out-of-memory ladder (child/climber.py), the snapshot and observer hooks (child/view.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

import httpx
import structlog

from ..core.command import build_argv
from ..core.crash import FATAL_WHILE_RUNNING
from ..core.ladder import RunSettings
from ..core.lifecycle import (
    Action,
    BackoffElapsed,
    Event,
    Finished,
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
    Warmup,
    initial,
    transition,
)
from ..core.placement import Plan
from ..host import memory
from ..host.gguf import block_count
from ..host.sdnotify import Notifier
from ..spec.loaded import Loaded, base_settings, policy_for
from ..spec.settings import Config
from ..telemetry.metrics import Metrics
from . import vram
from .climber import Climber
from .driver import ChildDriver
from .liveness import liveness
from .process import Child
from .progress import Exchange, LoopWatch, Progress
from .view import ExitListener, Observer, RunnerView

log = structlog.get_logger("supervisor")
SETTLED = (State.READY, State.FAILED, State.STOPPING, State.STOPPED)


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
        self._model_layers: int | None = None
        self._last_estimate: dict[str, Any] | None = None
        self.progress = Progress()  # signs of life from the child's answers (the proxy tells), read by liveness
        self.loop_watch = LoopWatch()  # what the last probe of the inference loop found (liveness writes it)
        self._closing = False
        self._traffic: Callable[[], int] = lambda: 0  # requests in flight or waiting (the proxy counts them)
        self.finished = asyncio.Event()
        self._settled = asyncio.Event()  # replaced on every state change: wakes everyone waiting for one
        self._observers: list[Observer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}  # one per kind: a new one replaces (cancels) the old
        # Probes and warmup keep no idle connection: it would pin one of llama-server's HTTP threads (see proxy.py).
        # Plain HTTP to the child on 127.0.0.1 only, never TLS: verify=False spares loading certifi's CA bundle
        # into an SSL context that is never used (45 ms on the event loop at every start, and 1.7 MB).
        self._http = httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0), verify=False)
        self.climber = Climber(self)
        self.driver = ChildDriver(self, task=self._task, on_lines=self._on_lines)

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
        return self.driver.child

    @property
    def child_url(self) -> str | None:
        return self.driver.url

    @property
    def argv(self) -> list[str]:
        return list(self.driver.argv)

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    @property
    def warmup(self) -> dict[str, Any] | None:
        return self.driver.warmup

    @property
    def model_layers(self) -> int | None:
        return self._model_layers

    @property
    def ready(self) -> bool:
        return self._machine.state is State.READY

    @property
    def last_progress(self) -> float:
        return self.progress.last

    def view(self) -> RunnerView:
        d = self.driver
        child = d.child
        return RunnerView(
            machine=self._machine, loaded=self._loaded, child_pid=child.pid if child else None,
            child_started_at=child.started_at if child else None, child_url=d.url,
            argv=tuple(d.argv), log_tail=tuple(d.log_tail()),
            load_s=d.load_s, warmup=d.warmup, model_layers=self._model_layers,
            vram_estimate=self._last_estimate, climb=self.climber.status(),
            loop=self.loop_watch.status(time.monotonic()) if child is not None else None)

    # ---- what the web side and the reloader tell the runner -----------------------------------

    def note_progress(self, *, stream: bool = False, ex: Exchange | None = None) -> None:
        """Bytes came from the child, or a request completed: proof of life for liveness. `stream`: a streamed
        chunk of generated text, which only a running inference loop produces; `ex`: the exchange it came on."""
        self.progress.note(stream=stream, ex=ex)

    def set_traffic(self, count: Callable[[], int]) -> None:
        """How many requests are in flight or waiting (climbing back waits for none)."""
        self._traffic = count

    def traffic(self) -> int:
        return self._traffic()

    def on_warmed(self, hook: Callable[[int, dict[str, Any]], Awaitable[None]]) -> None:
        """Awaited with (generation, warmup info) after a child's warmup, before it is reported ready."""
        self.driver.after_warmup.append(hook)

    def on_oom(self, hook: Callable[[frozenset[int] | None], Awaitable[bool]]) -> None:
        """Asked after an out-of-memory exit, before the ladder, with the GPUs that ran out (None: unknown): True
        when it freed memory (the pool unloaded idle models there), so the same settings are tried again."""
        self.driver.oom_hook = hook

    def on_exit(self, listener: ExitListener) -> None:
        """Called with (generation, verdict, returncode) for every classified exit."""
        self.driver.exit_listeners.append(listener)

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
                self._task(self.driver.run(gen, settings))
            case Kill(gen=gen, reason=reason):
                self._task(self.driver.kill(gen, reason))
            case Warmup(gen=gen):
                self._task(self.driver.warm(gen))
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
        if loaded.profile.gpus != "auto":
            identity.append(f"gpus={list(loaded.profile.gpus)}")  # settings learned on other GPUs are not these
        return memory.key_for(identity, loaded.profile.model, loaded.caps.binary)

    def _remember(self, settings: RunSettings) -> None:
        used = self.driver.settings  # with the GPUs it was placed on at its spawn, when the machine has none
        if settings.placement is None and used is not None and replace(used, placement=None) == settings:
            settings = used
        self._memory.save(self.memory_key(), settings, self._loaded.profile.name)

    def _recall(self) -> RunSettings | None:
        return self._memory.load(self.memory_key())

    learned = _recall  # public, for a plan (GET /plan): blocking, like the rest of learned settings

    def _forget(self) -> None:
        self._memory.forget(self.memory_key())

    # ---- starting ------------------------------------------------------------------------------

    async def start(self, plan: Plan | None = None) -> None:
        """Start a child: the first time, or again after stop() (a model the pool unloaded and loads again).
        The runner outlives its children: hooks, counters, generations and history carry over. `plan`: where
        the pool's residency decided it goes (several GPUs); None: decided here."""
        p = self._loaded.profile
        self._closing = False
        self.finished.clear()
        learned = await asyncio.to_thread(self._recall)
        self._model_layers = await asyncio.to_thread(block_count, p.model)
        base, learned, first, why, estimate = await vram.first_settings(
            p, self._loaded.caps, learned, self._model_layers, plan=plan, estimate=self.cfg.estimate_vram)
        self._last_estimate = estimate if learned is None else self._last_estimate
        if learned is not None and learned != base:
            log.info("learned_settings", settings=learned.as_dict(), profile=p.name)
            first, why = await self.climber.at_start(base, learned) or (learned, None)
        self._machine = initial(base, first, why, after=self._machine)
        self._task(liveness(self))
        self._task(self.climber.run())
        self.dispatch(Start(time.monotonic()))

    def _on_lines(self, gen: int, lines: list[str]) -> None:
        """Every line the child prints, a read's worth at a time (the driver's spawn wires it): observers see them;
        a fatal one ends the child."""
        for obs in self._observers:
            obs.child_lines(self, gen, lines)
        if self._machine.gen == gen and FATAL_WHILE_RUNNING.search("\n".join(lines)):
            line = next(ln for ln in lines if FATAL_WHILE_RUNNING.search(ln))
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

    async def stop(self, reason: str = "shutdown") -> None:
        """Stop the child (SIGTERM, then SIGKILL after stop_timeout_s) and every task; bounded. The runner can
        start() again afterwards (its HTTP client stays open until aclose())."""
        self._closing = True
        self.dispatch(StopRequested(time.monotonic(), reason))
        try:
            await asyncio.wait_for(self.finished.wait(), self.cfg.stop_timeout_s + 5.0)
        except TimeoutError:
            child = self.driver.child
            log.error("stop_timeout", state=self._machine.state.value, pid=child.pid if child else None)
            if child is not None:
                child.kill_now()
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop for good: the child, then the HTTP client."""
        await self.stop()
        await self._http.aclose()
