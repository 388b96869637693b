"""The child's life, carried out: spawn llama-server, wait for it to load, warm it up, stop it.

The runner decides (its Machine returns Spawn, Warmup and Kill actions); the driver does, and reports
back only through `Runner.dispatch`. It owns the facts about the current child: the process, its
generation, its address and command line, how long it took to load and what warmup measured.

Every task that runs a child ends with `ChildGone` and then `ChildExited`, whatever was raised inside it:
the instant wait() returns, the address is dropped and the machine leaves `ready` in one step (no await
in between); the classification and the out-of-memory evidence follow.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog

from ..core.command import CommandError, build_argv, child_env, redact
from ..core.crash import Cause, Verdict
from ..core.ladder import Evidence, RunSettings
from ..core.lifecycle import HUNG, ChildExited, ChildGone, Healthy, Unresponsive, WarmedUp
from . import vram
from .exits import examine
from .output import COALESCE_S
from .process import Child, oom_kill_count, spawn
from .readiness import NotReady, wait_healthy, warmup
from .view import ExitListener

if TYPE_CHECKING:
    from .view import RunnerCore

log = structlog.get_logger("supervisor")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChildDriver:
    def __init__(self, runner: RunnerCore, *, task: Callable[[Coroutine[Any, Any, Any]], None],
                 on_lines: Callable[[int, list[str]], None]) -> None:
        self.r = runner
        self._task = task  # the runner's: its stop() cancels what the driver started
        self._on_lines = on_lines  # (generation, lines) for every read of lines the child prints
        self.child: Child | None = None
        self.gen = 0  # the generation `child` belongs to
        self.url: str | None = None
        self.argv: list[str] = []
        self.last_tail: list[str] = []  # the last child's output, kept after it is gone
        self.load_s: float | None = None
        self.warmup: dict[str, Any] | None = None
        self.settings: RunSettings | None = None  # what the current (or last) child really runs with: its GPUs too
        self.avoid: set[int] = set()  # GPUs that ran out of memory since the last ready start
        self.exit_listeners: list[ExitListener] = []
        self.oom_hook: Callable[[frozenset[int] | None], Awaitable[bool]] | None = None
        # Awaited after a child's warmup, before it is reported ready (generation, warmup info): the proxy's
        # context guard learns the child's figures there. A hook handles its own errors.
        self.after_warmup: list[Callable[[int, dict[str, Any]], Awaitable[None]]] = []

    def log_tail(self) -> list[str]:
        return list(self.child.tail) if self.child is not None else self.last_tail

    async def run(self, gen: int, settings: RunSettings) -> None:
        """Start child `gen`, watch it, and end with ChildGone + ChildExited whatever happens in between."""
        child: Child | None = None
        verdict: Verdict | None = None
        rc: int | None = None
        evidence = Evidence(model_layers=self.r.model_layers)
        try:
            t0 = time.monotonic()
            oom_before = await asyncio.to_thread(oom_kill_count)
            child, verdict = await self._spawn(gen, settings)
            if child is not None:
                rc, verdict, evidence = await self._watch(gen, child, oom_before, t0)
        except asyncio.CancelledError:
            # Cancelled by the runner's stop: say why it stopped (a shutdown, or the pool's unload).
            verdict = verdict or Verdict(Cause.STOPPED, self.r.machine.kill_reason or "the supervisor is shutting down")
            raise
        except Exception as exc:  # whatever it was, the machine must hear that this child is over
            log.error("child_task_error", gen=gen, error=repr(exc), exc_info=exc)
            verdict = Verdict(Cause.INTERNAL, f"supervisor error while running llama-server: {exc!r}"[:500])
        finally:
            if child is not None and child.returncode is None:
                child.kill_now()  # never leave it behind: the kernel reaps it, the group goes with it
            self._gone(gen, child)
            self.r.dispatch(ChildExited(time.monotonic(), gen, verdict or Verdict(Cause.INTERNAL, "unknown exit"),
                                        rc, evidence, random.random()))
            for listener in self.exit_listeners:
                listener(gen, verdict or Verdict(Cause.INTERNAL, ""), rc)

    async def _spawn(self, gen: int, settings: RunSettings) -> tuple[Child | None, Verdict | None]:
        r = self.r
        p = r.loaded.profile
        port = p.port or free_port()
        # Several GPUs: settings without a placement (the profile's own, after a restart) get one now.
        settings, plan = await vram.settle(p, r.loaded.caps, settings, cut=r.cfg.estimate_vram)
        if plan is not None:
            log.info("placement", gen=gen, kind=plan.kind, placement=plan.as_dict(), why=plan.why)
        self.settings = settings
        try:
            argv = build_argv(p, r.loaded.caps, settings, port)
        except CommandError as exc:
            return None, Verdict(Cause.BAD_ARGS, str(exc))
        m = r.machine
        cause = m.history[-1].cause if m.history else "start"
        log.info("child_spawn", gen=gen, cause=cause, settings=settings.as_dict(),
                 adjustment=m.adjustment, argv=redact(argv))
        try:
            child = await spawn(argv, child_env(os.environ, p), on_lines=partial(self._on_lines, gen),
                                echo=r.cfg.log_child_output)
        except OSError as exc:
            return None, Verdict(Cause.SPAWN_FAILED, f"cannot start {argv[0]}: {exc.strerror or exc}")
        except (ValueError, TypeError) as exc:  # e.g. a NUL byte in an environment value
            return None, Verdict(Cause.BAD_ARGS, f"cannot start {argv[0]}: {exc}")
        self.child, self.gen, self.argv = child, gen, argv
        self.url, self.load_s = f"http://127.0.0.1:{port}", None
        m = r.machine
        if m.gen == gen and m.pending is not None:
            # A stop or restart was asked for while this child was being spawned: carry it out now.
            self._task(self.kill(gen, m.kill_reason))
        return child, None

    async def _watch(self, gen: int, child: Child, oom_before: int | None, t0: float
                     ) -> tuple[int, Verdict, Evidence]:
        r = self.r
        health = asyncio.create_task(self._await_health(gen, child, t0))
        try:
            rc = await child.wait()
        finally:
            health.cancel()
        m = r.machine
        killed_as = m.pending if m.gen == gen and m.pending in HUNG else None
        self._gone(gen, child)  # from this instant nothing is sent to it; the examination follows
        verdict, ev = await examine(child, rc, oom_before, gen, killed_as=killed_as, profile=r.loaded.profile,
                                    ctx_size=r.machine.effective.ctx_size, model_layers=r.model_layers,
                                    release_wait_s=r.cfg.vram_release_wait_s, metrics=r.metrics,
                                    free_others=self.oom_hook, caps=r.loaded.caps, settings=self.settings,
                                    avoid=frozenset(self.avoid))
        self.avoid = set(ev.avoid)
        return rc, verdict, ev

    def _gone(self, gen: int, child: Child | None) -> None:
        """The child of `gen` is gone: drop its address and tell the machine, in one step (no await)."""
        if child is not None and self.child is child:
            self.last_tail = list(child.tail)
            self.child, self.url = None, None
        m = self.r.machine
        if m.gen == gen and m.child_alive:
            self.r.dispatch(ChildGone(time.monotonic(), gen))

    async def _await_health(self, gen: int, child: Child, t0: float) -> None:
        r = self.r
        try:
            await wait_healthy(r.http, self.url or "", child, stall_s=r.cfg.load_stall_s, max_s=r.cfg.load_max_s)
        except NotReady as exc:
            if child.returncode is None:
                r.dispatch(Unresponsive(time.monotonic(), gen, f"load: {exc}"))
            return
        self.load_s = time.monotonic() - t0
        r.metrics.load_seconds.set(self.load_s)
        child.coalesce_s = COALESCE_S  # nothing waits on its lines any more: read them in bursts (output.py)
        r.dispatch(Healthy(time.monotonic(), gen))

    async def warm(self, gen: int) -> None:
        r = self.r
        p = r.loaded.profile
        if not p.warmup:
            self.warmup = {"skipped": True}
            await self._warmed(gen)
            return
        try:
            info = await warmup(r.http, self.url or "", image=p.images if p.mmproj is not None else None,
                                timeout_s=r.cfg.warmup_timeout_s)
        except NotReady as exc:
            r.dispatch(Unresponsive(time.monotonic(), gen, f"warmup: {exc}"))
            return
        self.warmup = info
        r.metrics.warmup_seconds.set(float(info["seconds"]))  # type: ignore[arg-type]
        eff = r.machine.effective
        r.metrics.gpu_layers.set(eff.n_gpu_layers if isinstance(eff.n_gpu_layers, int) else -1)
        r.metrics.ctx_size.set(eff.ctx_size)
        r.note_progress()
        await self._warmed(gen)

    async def _warmed(self, gen: int) -> None:
        self.avoid.clear()  # it runs: a later out-of-memory exit starts a new series
        for hook in self.after_warmup:
            await hook(gen, self.warmup or {})
        self.r.dispatch(WarmedUp(time.monotonic(), gen))

    async def kill(self, gen: int, reason: str) -> None:
        child = self.child
        if child is None or self.gen != gen:
            return  # not spawned yet: _spawn sees machine.pending and comes back here
        pending = self.r.machine.pending
        log.info("child_stop", gen=gen, pid=child.pid, reason=reason, cause=pending.value if pending else None)
        if pending is Cause.WEDGED:
            # Its inference loop (the main thread) is stuck: SIGTERM is acted on by that loop and would only
            # cost the wait. Killed at once, so the requests it held go to the next child sooner.
            child.kill_now()
            await child.wait()
            return
        await child.stop(2.0 if pending is Cause.UNRESPONSIVE else self.r.cfg.stop_timeout_s)
