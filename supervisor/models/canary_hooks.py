"""What an upgrade (models/upgrade.py) needs of a model and hangs on its runner: the Target it works through, the
builds /status shows, the in-place candidate's golden set before it is reported ready, and the watch that rolls
back a candidate that fails in place or a switched build that dies on probation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from ..child import canary as run
from ..child.runner import Runner
from ..child.view import RunnerCore
from ..core import canary
from ..core.canary import Measured, Verdict
from ..core.lifecycle import Machine, State
from ..core.upgrade import in_probation
from ..host.builds import Build
from ..spec.loaded import Loaded
from ..spec.settings import Config
from ..telemetry.metrics import BoxMetrics
from .hooks import BoxNotifier
from .model import Model
from .pool import Pool


class Target(Protocol):
    """What an upgrade needs of a model: its id, its runner, a restart with requests held (new requests wait
    while those in flight finish, bounded by drain_s, after the balancer was told when /health counts the model),
    and an immediate one for going back from a child that is not serving anyway."""

    @property
    def id(self) -> str: ...

    @property
    def runner(self) -> Runner: ...

    @property
    def loaded(self) -> Loaded:
        """What the model is set to run (a restart sets it before its child is replaced): what a reload compares."""
        ...

    async def restart_with(self, loaded: Loaded, why: str) -> None: ...

    def restart_now(self, loaded: Loaded, why: str) -> None: ...


class ModelTarget:
    """A pool's model as an upgrade's Target; `restart` is the reloader's restart of one model (drain notice for
    a model /health counts, then the pool's replace: hold, let requests finish, restart)."""

    def __init__(self, model: Model, restart: Callable[[str, Loaded, str], Awaitable[None]]) -> None:
        self.model, self._restart = model, restart

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def runner(self) -> Runner:
        return self.model.runner

    @property
    def loaded(self) -> Loaded:
        return self.model.loaded

    async def restart_with(self, loaded: Loaded, why: str) -> None:
        await self._restart(self.model.id, loaded, why)

    def restart_now(self, loaded: Loaded, why: str) -> None:
        self.model.loaded, self.model.measured = loaded, None
        self.model.runner.replace_profile(loaded)


Observer = Callable[[str, str, dict[str, Any]], None]  # (model, event, details): the timeline, metrics, systemd


@dataclass
class ModelBuilds:
    """One model's builds, for /status and the page, and what probation needs to go back."""

    running: Build | None = None
    profile: Build | None = None  # the build the profile's path leads to
    last_good: Build | None = None
    candidate: dict[str, Any] | None = None  # build, state (canary, probation, rejected, good), reasons, verdict
    note: str = ""
    pending: Loaded | None = None  # a candidate waiting for the model to be ready before its canary
    watch: list[str] = field(default_factory=list)  # the profile's binary and every symlink on the way
    adopt: Build | None = None  # no last good build yet: this one becomes it once ready
    switched_at: float | None = None  # monotonic: a switched build is on probation
    previous: tuple[Loaded, Build | None] | None = None  # what probation goes back to
    probation: asyncio.TimerHandle | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        def b(x: Build | None) -> dict[str, Any] | None:
            return x.as_dict() if x is not None else None

        return {"running": b(self.running), "profile": b(self.profile), "last_good": b(self.last_good),
                "candidate": self.candidate, "note": self.note or None, "pending": self.pending is not None}


def reporter(pool: Pool, metrics: BoxMetrics) -> Observer:
    """The metrics and systemd's STATUS line (through the model's notifier: the default model speaks for the box)
    follow every upgrade outcome."""

    def report(mid: str, event: str, d: dict[str, Any]) -> None:
        if event in ("switched", "rejected", "good") and not d.get("dry_run"):
            metrics.upgrades.labels(mid, event).inc()
        model = pool.models.get(mid)
        notifier = model.runner.notifier if model is not None else None
        if event == "rejected":
            for row in ((d.get("verdict") or {}).get("rows") or [{"check": "probation", "ok": False}]):
                if not row["ok"]:
                    metrics.upgrade_failed.labels(mid, row["check"]).set(1)
            if isinstance(notifier, BoxNotifier):
                notifier.set_note(f"upgrade to {d.get('build')} rolled back: {'; '.join(d.get('reasons') or [])}")
        elif event == "good":
            for labels in [s.labels for fam in metrics.upgrade_failed.collect() for s in fam.samples]:
                if labels.get("model") == mid:
                    metrics.upgrade_failed.remove(mid, labels["check"])
            if isinstance(notifier, BoxNotifier) and notifier.note:
                notifier.set_note("")

    return report


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Follower:
    """Watches a model's machine: a child that fails (backoff or failed, whatever ended it: a crash, a failed
    warmup) while an in-place candidate is being tried, or within probation after a switch, is rolled back; a
    candidate that waited for the model to be ready gets its canary once it is."""

    def __init__(self, owner: Owner, target: Target) -> None:
        self.owner, self.target = owner, target

    def machine_changed(self, runner: RunnerCore, old: Machine, new: Machine) -> None:
        if old.state is new.state:
            return
        owner, mid = self.owner, self.target.id
        if new.state is State.READY:
            owner.kick(self.target)
            return
        if new.state not in (State.BACKOFF, State.FAILED):
            return
        why = ((new.history[-1].detail if new.history else "") or new.reason or new.state.value)[:400]
        pending = owner.in_place.get(mid)
        if pending is not None and runner.loaded is pending.candidate and not pending.done.done():
            pending.failed(self.target, why)
            return
        st = owner.models.get(mid)
        if st is not None and st.previous is not None and runner.loaded is not st.previous[0] and in_probation(
                st.switched_at, time.monotonic(), owner.cfg.upgrade_probation_s):
            owner.task(owner.probation_failed(self.target, why))

    def child_lines(self, runner: RunnerCore, gen: int, lines: list[str]) -> None:
        pass


class InPlace:
    """A candidate run by the model's own runner (no room beside): its golden set runs after its warmup, before
    it is reported ready; a failure (there, or an exit before) restarts the old build at once."""

    def __init__(self, candidate: Loaded, old_loaded: Loaded, old: Measured, golden: list[canary.Golden],
                 label: str, owner: Owner) -> None:
        self.candidate, self.old_loaded, self.old, self.golden, self.label = candidate, old_loaded, old, golden, label
        self.owner = owner
        self.done: asyncio.Future[tuple[Verdict, Measured | None]] = asyncio.get_running_loop().create_future()

    async def check(self, target: Target) -> None:
        r = target.runner
        child, url = r.child, r.child_url
        if child is None or url is None:
            return
        new = await run.measure_running(r.http, url, child.pid, self.label, self.golden, self.owner.timing)
        if canary.too_slow(self.old, new, self.owner.limits):  # one unlucky round on a busy box: measure again
            (answers,) = await run.again(r.http, [url], self.golden, self.owner.timing, [new.answers])
            new = Measured(new.build, new.failure, answers, new.memory)
        verdict = canary.compare(self.old, new, self.owner.limits)
        if not verdict.passed:
            target.restart_now(self.old_loaded, "upgrade canary failed")  # before ready: no request reached it
        if not self.done.done():
            self.done.set_result((verdict, new))

    def failed(self, target: Target, why: str) -> None:
        """Called from the runner's dispatch (an observer): the restart is asked for just after it, not inside,
        and before a backoff could start the candidate again."""
        r = target.runner

        def back() -> None:
            if r.loaded is self.candidate:
                target.restart_now(self.old_loaded, "upgrade canary failed")

        asyncio.get_running_loop().call_soon(back)
        verdict = canary.compare(self.old, Measured(self.label, why), self.owner.limits)
        if not self.done.done():
            self.done.set_result((verdict, None))


class Owner(Protocol):
    """What the hooks need of models/upgrade.py's Upgrades (named by what it does, so neither imports the other)."""

    cfg: Config
    models: dict[str, ModelBuilds]
    in_place: dict[str, InPlace]

    @property
    def limits(self) -> canary.Limits: ...

    @property
    def timing(self) -> run.Timing: ...

    def kick(self, target: Target) -> None: ...

    def task(self, coro: Any) -> None: ...

    async def probation_failed(self, target: Target, why: str) -> None: ...
