"""Upgrading llama-server under a running model: the canary, the switch, the way back (docs/upgrading.md).

Which build runs is core/upgrade.py's plan (the last good one; a new build at the profile's path is a candidate);
what counts as good enough is core/canary.py's; the golden set and a candidate run beside the old child are
child/canary.py's. This module puts them in order for one model at a time:

1. the old build answers the golden set (live, when its child serves; else what was recorded with it);
2. the candidate runs beside the old child when memory allows (the old one keeps serving, untouched), else in
   its place: requests are held as during any restart, the candidate is started by the model's own runner and
   asked the golden set before it is reported ready, and a failure brings the old build back before any
   request reaches the candidate;
3. pass → switch (a restart with requests held); the candidate stays on probation for `upgrade_probation_s`, and
   a death within it rolls back the same way; after probation it becomes the last good build. Fail → the last
   good build keeps serving, the candidate is rejected (not tried again until the path leads to another build).
Every outcome goes to the observers (the timeline, metrics, systemd's STATUS) and to /status (`builds`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from ..child import canary as run
from ..child.runner import Runner
from ..child.view import RunnerCore
from ..core import canary
from ..core.canary import Limits, Measured, Verdict
from ..core.lifecycle import Machine, State
from ..core.upgrade import Facts, Run, in_probation, plan
from ..host import builds
from ..host.builds import Build, BuildBook
from ..host.room import room
from ..spec.loaded import Loaded
from ..spec.settings import Config

log = structlog.get_logger("upgrade")


class Target(Protocol):
    """What an upgrade needs of a model: its id, its runner, and a restart with requests held (new requests
    wait while those in flight finish, bounded by drain_s, then the runner restarts with `loaded`)."""

    @property
    def id(self) -> str: ...

    @property
    def runner(self) -> Runner: ...

    async def restart_with(self, loaded: Loaded, why: str) -> None: ...


Observer = Callable[[str, str, dict[str, Any]], None]  # (model, event, details): the timeline, metrics, systemd


@dataclass
class ModelBuilds:
    """One model's builds, for /status and the page, and what probation needs to go back."""

    running: Build | None = None
    profile: Build | None = None  # the build the profile's path leads to
    last_good: Build | None = None
    candidate: dict[str, Any] | None = None  # build, state (canary, probation, rejected, good), reasons, verdict
    note: str = ""
    adopt: Build | None = None  # no last good build yet: this one becomes it once ready
    switched_at: float | None = None  # monotonic: a switched build is on probation
    previous: tuple[Loaded, Build | None] | None = None  # what probation goes back to
    probation: asyncio.TimerHandle | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        def b(x: Build | None) -> dict[str, Any] | None:
            return x.as_dict() if x is not None else None

        return {"running": b(self.running), "profile": b(self.profile), "last_good": b(self.last_good),
                "candidate": self.candidate, "note": self.note or None}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Upgrades:
    def __init__(self, cfg: Config, book: BuildBook | None = None) -> None:
        self.cfg = cfg
        self.book = book or BuildBook(cfg.state_dir)
        self.models: dict[str, ModelBuilds] = {}
        self.observers: list[Observer] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_place: dict[str, _InPlace] = {}

    @property
    def limits(self) -> Limits:
        return Limits(self.cfg.upgrade_max_slowdown, self.cfg.upgrade_max_memory_growth)

    @property
    def timing(self) -> run.Timing:
        c = self.cfg
        return run.Timing(load_stall_s=c.load_stall_s, load_max_s=c.load_max_s, request_timeout_s=c.warmup_timeout_s,
                          stop_timeout_s=c.stop_timeout_s)

    def busy(self, mid: str) -> bool:
        lock = self._locks.get(mid)
        return lock is not None and lock.locked()

    def _tell(self, mid: str, event: str, **details: Any) -> None:
        for obs in self.observers:
            try:
                obs(mid, event, details)
            except Exception as exc:  # noqa: BLE001 - an observer's bug must not stop an upgrade half-way
                log.error("upgrade_observer_error", error=repr(exc))

    def _task(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for st in self.models.values():
            if st.probation is not None:
                st.probation.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- which build runs -----------------------------------------------------------------------------

    async def resolve(self, mid: str, loaded: Loaded) -> tuple[Loaded, bool]:
        """The Loaded a model's runner should run for this (validated) profile, and whether the profile's build
        is a candidate to try. Called at start and at every reload."""
        st = self.models.setdefault(mid, ModelBuilds())
        try:
            cur = await asyncio.to_thread(builds.identify, loaded.profile.binary, loaded.caps.version)
        except OSError as exc:
            log.warning("build_unknown", model=mid, binary=loaded.profile.binary, error=str(exc))
            return loaded, False
        book = self.book
        good, runnable, rejected, seen = await asyncio.to_thread(
            lambda: (book.last_good(mid), book.runnable(mid), book.rejected(mid, cur), book.seen(mid)))
        p = plan(Facts(cur.sha256, seen, good.sha256 if good else None, runnable is not None, rejected is not None))
        st.profile, st.last_good, st.note = cur, good, p.note
        if rejected is not None:
            st.candidate = {"build": cur.as_dict(), "state": "rejected", "reasons": rejected.get("reasons"),
                            "at": rejected.get("at")}
        chosen, canary_due, adopt = loaded, p.canary, p.adopt
        if p.run is Run.LAST_GOOD and runnable is not None:
            prepared = await run.prepare(loaded, runnable)
            if isinstance(prepared, str):
                # The last good build cannot run this profile as edited (a flag it lacks): the profile's build runs.
                st.note = f"the last good build cannot run this profile ({prepared}): running the profile's build"
                canary_due, adopt = False, True
            else:
                chosen = prepared
        st.running = cur if chosen is loaded else good
        st.adopt = cur if adopt else None
        if st.note:
            log.info("build_plan", model=mid, note=st.note, profile_build=cur.label(),
                     last_good=good.label() if good else None)
        if not canary_due:
            await asyncio.to_thread(book.set_seen, mid, cur.sha256)
        return chosen, canary_due

    def attach(self, target: Target) -> None:
        """Follow a model's runner: adopt a first build once it is ready, run an in-place canary's golden set
        before its candidate is reported ready, and roll back a switched build that dies on probation."""
        r = target.runner

        async def warmed(gen: int, _info: dict[str, Any]) -> None:
            st = self.models.get(target.id)
            if st is not None and st.adopt is not None and r.loaded.caps.binary == st.adopt.path:
                build, st.adopt = st.adopt, None
                self._task(self._adopt(target.id, build))
            pending = self._in_place.get(target.id)
            if pending is not None and r.loaded is pending.candidate and not pending.done.done():
                await pending.check(r)

        r.on_warmed(warmed)
        r.observe(_Follower(self, target))

    async def _adopt(self, mid: str, build: Build) -> None:
        await asyncio.to_thread(self.book.set_good, mid, build, None)
        await asyncio.to_thread(self.book.set_seen, mid, build.sha256)
        st = self.models.setdefault(mid, ModelBuilds())
        st.last_good = build
        log.info("build_adopted", model=mid, build=build.label())

    # ---- the canary ---------------------------------------------------------------------------------

    async def try_binary(self, target: Target, binary: str, *, dry_run: bool = False, source: str = "api"
                         ) -> dict[str, Any]:
        """`llama-supervisor upgrade --binary PATH`: the running profile with another binary."""
        prepared = await run.prepare(target.runner.loaded, binary)
        if isinstance(prepared, str):
            return await self._refused(target.id, binary, prepared, dry_run, source)
        return await self.try_candidate(target, prepared, dry_run=dry_run, source=source)

    async def _refused(self, mid: str, binary: str, why: str, dry_run: bool, source: str) -> dict[str, Any]:
        try:
            build = await asyncio.to_thread(builds.identify, binary, "unknown")
        except OSError as exc:
            return {"passed": False, "switched": False, "reasons": [f"cannot read {binary}: {exc.strerror or exc}"]}
        st = self.models.setdefault(mid, ModelBuilds())
        old = st.running.label() if st.running else "running"
        verdict = canary.compare(Measured(old), Measured(build.label(), why), self.limits)
        return await self._failed(mid, build, verdict, dry_run, source)

    async def try_candidate(self, target: Target, candidate: Loaded, *, dry_run: bool = False,
                            source: str = "file change") -> dict[str, Any]:
        mid = target.id
        lock = self._locks.setdefault(mid, asyncio.Lock())
        async with lock:
            try:
                build = await asyncio.to_thread(builds.identify, candidate.caps.binary, candidate.caps.version)
            except OSError as exc:
                return {"passed": False, "switched": False, "reasons": [f"cannot read {candidate.caps.binary}: {exc}"]}
            st = self.models.setdefault(mid, ModelBuilds())
            if st.running is not None and build.sha256 == st.running.sha256:
                return {"passed": True, "switched": False, "note": "this build is already running",
                        "build": build.as_dict()}
            st.candidate = {"build": build.as_dict(), "state": "canary", "source": source, "at": _now()}
            self._tell(mid, "canary", build=build.label(), source=source, dry_run=dry_run)
            before = target.runner.loaded
            try:
                verdict, new, where = await self._compare(target, candidate, build)
            except Exception as exc:  # the old build keeps serving whatever went wrong here
                log.error("canary_error", model=mid, error=repr(exc), exc_info=exc)
                verdict = canary.compare(Measured("running"), Measured(build.label(), f"canary error: {exc!r}"),
                                         self.limits)
                new, where = None, "nowhere"
            log.info("canary_verdict", model=mid, build=build.label(), where=where, passed=verdict.passed,
                     reasons=verdict.reasons, dry_run=dry_run)
            if not verdict.passed:
                return await self._failed(mid, build, verdict, dry_run, source, where)
            return await self._passed(target, candidate, before, build, verdict, new, dry_run, source, where)

    async def _compare(self, target: Target, candidate: Loaded, build: Build
                       ) -> tuple[Verdict, Measured | None, str]:
        r = target.runner
        p = r.loaded.profile
        golden = await run.golden_for(p.images if p.mmproj is not None else None)
        st = self.models[target.id]
        old_label = st.running.label() if st.running else "running"
        child, url = r.child, r.child_url
        if r.ready and child is not None and url is not None:
            old = await run.measure_running(r.http, url, child.pid, old_label, golden, self.timing)
        else:
            recorded = await asyncio.to_thread(self.book.golden, target.id)
            old = Measured.from_dict(recorded) if recorded else canary.baseline_unknown(golden)
        here = await asyncio.to_thread(room, self.cfg.memory_budget_mib)
        budget = self.cfg.memory_budget_mib
        left = None if budget is None or old.memory is None else budget - old.memory.host_mib
        beside, why = canary.fits_beside(old.memory, here, self.limits, left)
        if beside:
            tried = await run.try_candidate(candidate, r.machine.effective, build.label(), golden, self.timing, r.http)
            return canary.compare(old, tried, self.limits), tried, "beside"
        log.info("canary_in_place", model=target.id, why=why)
        pending = _InPlace(candidate, r.loaded, old, golden, build.label(), self)
        new: Measured | None
        self._in_place[target.id] = pending
        try:
            await target.restart_with(candidate, f"upgrade canary: {build.label()} ({why})")
            limit = self.cfg.load_max_s + 2 * self.cfg.warmup_timeout_s
            verdict, new = await asyncio.wait_for(asyncio.shield(pending.done), limit)
        except TimeoutError:
            pending.failed(r, "no verdict in time")
            verdict, new = await pending.done
        finally:
            self._in_place.pop(target.id, None)
        return verdict, new, "in place"

    async def _passed(self, target: Target, candidate: Loaded, before: Loaded, build: Build, verdict: Verdict,
                      new: Measured | None, dry_run: bool, source: str, where: str) -> dict[str, Any]:
        mid = target.id
        st = self.models[mid]
        previous = (before, st.running)
        if dry_run:
            if where == "in place":
                await target.restart_with(before, "upgrade canary: dry run, back to the running build")
            st.candidate = {"build": build.as_dict(), "state": "passed (dry run)", "at": _now(),
                            "verdict": verdict.as_dict()}
            self._tell(mid, "passed", build=build.label(), switched=False, verdict=verdict.as_dict(), source=source)
            return {"passed": True, "switched": False, "dry_run": True, "where": where, "verdict": verdict.as_dict()}
        if where != "in place":
            await target.restart_with(candidate, f"upgrade: {build.label()} passed its canary")
        st.previous, st.switched_at, st.running = previous, time.monotonic(), build
        st.candidate = {"build": build.as_dict(), "state": "probation", "at": _now(), "verdict": verdict.as_dict(),
                        "probation_s": self.cfg.upgrade_probation_s}
        if st.probation is not None:
            st.probation.cancel()
        golden = new.as_dict() if new is not None else None
        st.probation = asyncio.get_running_loop().call_later(
            self.cfg.upgrade_probation_s, lambda: self._task(self._probation_passed(mid, build, golden, source)))
        self._tell(mid, "switched", build=build.label(), verdict=verdict.as_dict(), source=source, where=where)
        return {"passed": True, "switched": True, "where": where, "verdict": verdict.as_dict()}

    async def _probation_passed(self, mid: str, build: Build, golden: dict[str, Any] | None, source: str) -> None:
        st = self.models[mid]
        if st.running is None or st.running.sha256 != build.sha256 or st.switched_at is None:
            return
        st.switched_at, st.previous, st.probation = None, None, None
        await asyncio.to_thread(self.book.set_good, mid, build, golden)
        if source != "api" and st.profile is not None:
            await asyncio.to_thread(self.book.set_seen, mid, st.profile.sha256)
        st.last_good, st.note = build, ""
        st.candidate = {**(st.candidate or {}), "state": "good", "at": _now()}
        self._tell(mid, "good", build=build.label())

    async def _probation_failed(self, target: Target, why: str) -> None:
        mid = target.id
        st = self.models[mid]
        if st.previous is None or st.running is None:
            return
        (old_loaded, old_build), bad = st.previous, st.running
        st.previous, st.switched_at = None, None
        if st.probation is not None:
            st.probation.cancel()
            st.probation = None
        reason = f"died within upgrade_probation_s after the switch: {why}"
        await target.restart_with(old_loaded, f"upgrade rolled back: {bad.label()} {reason}")
        st.running = old_build
        await self._record_failure(mid, bad, [reason], None, "probation")

    async def _failed(self, mid: str, build: Build, verdict: Verdict, dry_run: bool, source: str,
                      where: str = "nowhere") -> dict[str, Any]:
        if not dry_run:
            await self._record_failure(mid, build, verdict.reasons, verdict, source)
        else:
            self.models[mid].candidate = {"build": build.as_dict(), "state": "failed (dry run)", "at": _now(),
                                          "reasons": verdict.reasons, "verdict": verdict.as_dict()}
        return {"passed": False, "switched": False, "dry_run": dry_run, "where": where, "reasons": verdict.reasons,
                "verdict": verdict.as_dict()}

    async def _record_failure(self, mid: str, build: Build, reasons: list[str], verdict: Verdict | None,
                              source: str) -> None:
        st = self.models.setdefault(mid, ModelBuilds())
        at = _now()
        await asyncio.to_thread(self.book.reject, mid, build, reasons, at)
        if source not in ("api", "probation") and st.profile is not None:
            await asyncio.to_thread(self.book.set_seen, mid, st.profile.sha256)
        running = st.running.label() if st.running else "the last good build"
        st.note = f"{build.label()} rolled back ({'; '.join(reasons)[:300]}): serving {running}"
        st.candidate = {"build": build.as_dict(), "state": "rejected", "at": at, "reasons": reasons,
                        "verdict": verdict.as_dict() if verdict else None}
        self._tell(mid, "rejected", build=build.label(), reasons=reasons, running=running,
                   verdict=verdict.as_dict() if verdict else None, source=source)


class _Follower:
    """Watches a model's machine: a child that fails (backoff or failed, whatever killed it: a crash, a failed
    warmup) while an in-place candidate is being tried, or within probation after a switch, is rolled back."""

    def __init__(self, owner: Upgrades, target: Target) -> None:
        self.owner, self.target = owner, target

    def machine_changed(self, runner: RunnerCore, old: Machine, new: Machine) -> None:
        if new.state not in (State.BACKOFF, State.FAILED) or old.state is new.state:
            return
        why = (new.history[-1].detail if new.history else "") or new.reason or new.state.value
        owner, mid = self.owner, self.target.id
        pending = owner._in_place.get(mid)
        if pending is not None and runner.loaded is pending.candidate and not pending.done.done():
            pending.failed(self.target.runner, why[:400])
            return
        st = owner.models.get(mid)
        if st is not None and st.previous is not None and runner.loaded is not st.previous[0] and in_probation(
                st.switched_at, time.monotonic(), owner.cfg.upgrade_probation_s):
            owner._task(owner._probation_failed(self.target, why[:400]))

    def child_lines(self, runner: RunnerCore, gen: int, lines: list[str]) -> None:
        pass


class _InPlace:
    """A candidate run by the model's own runner (no room beside): its golden set runs after its warmup, before
    it is reported ready; a failure (there, or an exit before) restarts the old build at once."""

    def __init__(self, candidate: Loaded, old_loaded: Loaded, old: Measured, golden: list[canary.Golden],
                 label: str, owner: Upgrades) -> None:
        self.candidate, self.old_loaded, self.old, self.golden, self.label = candidate, old_loaded, old, golden, label
        self.owner = owner
        self.done: asyncio.Future[tuple[Verdict, Measured | None]] = asyncio.get_running_loop().create_future()

    async def check(self, r: Runner) -> None:
        child, url = r.child, r.child_url
        if child is None or url is None:
            return
        new = await run.measure_running(r.http, url, child.pid, self.label, self.golden, self.owner.timing)
        verdict = canary.compare(self.old, new, self.owner.limits)
        if not verdict.passed:
            r.replace_profile(self.old_loaded)  # before ready: no request reaches the candidate
        if not self.done.done():
            self.done.set_result((verdict, new))

    def failed(self, r: Runner, why: str) -> None:
        """Called from the runner's dispatch (an observer): the restart is asked for just after it, not inside."""
        if r.loaded is self.candidate:
            asyncio.get_running_loop().call_soon(
                lambda: r.replace_profile(self.old_loaded) if r.loaded is self.candidate else None)
        verdict = canary.compare(self.old, Measured(self.label, why), self.owner.limits)
        if not self.done.done():
            self.done.set_result((verdict, None))
