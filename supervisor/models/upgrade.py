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
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..child import canary as run
from ..core import canary
from ..core.canary import Limits, Measured, Verdict
from ..core.upgrade import Facts, Run, plan
from ..host import builds
from ..host.builds import Build, BuildBook
from ..host.room import room
from ..spec.loaded import Loaded, same_child
from ..spec.settings import Config
from .canary_hooks import Follower, InPlace, ModelBuilds, Observer, Target, now_iso
from .catalog import Catalog

log = structlog.get_logger("upgrade")


class Upgrades:
    def __init__(self, cfg: Config, book: BuildBook | None = None) -> None:
        self.cfg = cfg
        self.book = book or BuildBook(cfg.state_dir)
        self.models: dict[str, ModelBuilds] = {}
        self.observers: list[Observer] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.in_place: dict[str, InPlace] = {}
        # One of a model's upstream slots around each golden request to its serving child (the web side's gate).
        self.slot: Callable[[str], contextlib.AbstractAsyncContextManager[None]] | None = None
        self.targets: dict[str, Target] = {}
        self._kicked: set[str] = set()  # a canary task made, its lock not yet taken
        self._reload_after: set[str] = set()  # a reload left these models alone: reload once their upgrade ends
        self.reload: Callable[[str], Awaitable[Any]] | None = None  # the reloader's (the daemon wires it)

    def _slot(self, mid: str) -> run.Slot | None:
        slot = self.slot
        return None if slot is None else (lambda: slot(mid))

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
        return mid in self._kicked or (lock is not None and lock.locked())

    def hold(self, mid: str) -> bool:
        """The reloader's question as it applies a model: an upgrade under way keeps it, and reloads after."""
        held = self.busy(mid) and mid in self.targets
        if held:
            self._reload_after.add(mid)
        return held

    def _tell(self, mid: str, event: str, **details: Any) -> None:
        for obs in self.observers:
            try:
                obs(mid, event, details)
            except Exception as exc:  # noqa: BLE001 - an observer's bug must not stop an upgrade half-way
                log.error("upgrade_observer_error", error=repr(exc))

    def task(self, coro: Any) -> None:
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

    async def resolve_catalog(self, catalog: Catalog) -> None:
        """Every model's Loaded replaced by the one to run (the last good build, or the build on probation); a
        candidate at a profile's path waits for its model to be ready, then gets its canary (kick). While an
        upgrade is under way for a model (kicked, canary, switch) it owns the model's child: a reload leaves it
        as it is (hold) and is done again after it, so an edit applies then and no candidate is tried twice."""
        for mid, loaded in list(catalog.models.items()):
            target = self.targets.get(mid)
            if target is not None and self.hold(mid):
                catalog.models[mid] = target.loaded
                catalog.held.add(mid)  # even if the upgrade ends before this reload applies it
                continue
            chosen, due = await self.resolve(mid, loaded)
            catalog.models[mid] = chosen
            self.models[mid].pending = loaded if due else None
            # A canary measures the child that serves: one this reload restarts is kicked by its READY.
            if due and target is not None and same_child(target.loaded, chosen):
                self.kick(target)

    def watched(self) -> dict[str, set[str]]:
        """The paths whose change means another build at a profile's binary (the file, every symlink on the
        way), for the reloader's watch; "" marks them as files whose change reloads (which resolves again)."""
        out: dict[str, set[str]] = {}
        for st in self.models.values():
            for path in st.watch:
                out.setdefault(path, set()).add("")
        return out

    def kick(self, target: Target) -> None:
        """A candidate waiting for its model: its canary starts once the model is ready, one at a time."""
        st = self.models.get(target.id)
        if st is None or st.pending is None or not target.runner.ready or self.busy(target.id):
            return
        candidate, st.pending = st.pending, None
        self._kicked.add(target.id)  # busy from now: a reload before the task runs must not touch the child
        async def canary_task() -> None:
            try:
                await self.try_candidate(target, candidate, source="file change", kicked=True)
            finally:
                self._kicked.discard(target.id)  # also when cancelled before it took the lock

        self.task(canary_task())

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
        st.watch = await asyncio.to_thread(builds.watch_paths, loaded.profile.binary)
        if rejected is not None:
            st.candidate = {"build": cur.as_dict(), "state": "rejected", "reasons": rejected.get("reasons"),
                            "at": rejected.get("at")}
        chosen, canary_due, adopt = loaded, p.canary, p.adopt
        running = st.running
        if st.switched_at is not None and running is not None and (cur.sha256 == running.sha256 or not p.canary):
            # A switched build on probation keeps running through reloads, unless a newer candidate comes.
            if cur.sha256 == running.sha256:
                return loaded, False
            prepared = await run.prepare(loaded, running.path)
            return (prepared if not isinstance(prepared, str) else loaded), False
        if p.run is Run.LAST_GOOD and runnable is not None:
            prepared = await run.prepare(loaded, runnable)
            if isinstance(prepared, str):  # the last good build lacks a flag of this profile as edited
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
        self.targets[target.id] = target

        async def warmed(gen: int, _info: dict[str, Any]) -> None:
            st = self.models.get(target.id)
            if st is not None and st.adopt is not None and r.loaded.caps.binary == st.adopt.path:
                build, st.adopt = st.adopt, None
                self.task(self._adopt(target.id, build))
            pending = self.in_place.get(target.id)
            if pending is not None and r.loaded is pending.candidate and not pending.done.done():
                await pending.check(target)

        r.on_warmed(warmed)
        r.observe(Follower(self, target))

    def forget(self, mid: str) -> None:
        """A model removed from the catalog."""
        self.targets.pop(mid, None)
        st = self.models.pop(mid, None)
        if st is not None and st.probation is not None:
            st.probation.cancel()

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
            return {"passed": False, "switched": False, "verdict": None,
                    "reasons": [f"cannot read {binary}: {exc.strerror or exc}"]}
        st = self.models.setdefault(mid, ModelBuilds())
        old = st.running.label() if st.running else "running"
        verdict = canary.compare(Measured(old), Measured(build.label(), why), self.limits)
        return await self._failed(mid, build, verdict, dry_run, source)

    async def try_candidate(self, target: Target, candidate: Loaded, *, dry_run: bool = False,
                            source: str = "file change", kicked: bool = False) -> dict[str, Any]:
        mid = target.id
        lock = self._locks.setdefault(mid, asyncio.Lock())
        try:
            async with lock:
                if kicked:  # the lock now says busy (an API upgrade that took it first leaves the mark alone)
                    self._kicked.discard(mid)
                return await self._try(target, candidate, dry_run, source)
        finally:
            if mid in self._reload_after and not self.busy(mid) and self.reload is not None:
                self._reload_after.discard(mid)
                self.task(self.reload("after the upgrade"))

    async def _try(self, target: Target, candidate: Loaded, dry_run: bool, source: str) -> dict[str, Any]:
        mid = target.id  # the model's lock held
        try:
            build = await asyncio.to_thread(builds.identify, candidate.caps.binary, candidate.caps.version)
        except OSError as exc:
            return {"passed": False, "switched": False, "verdict": None,
                    "reasons": [f"cannot read {candidate.caps.binary}: {exc}"]}
        st = self.models.setdefault(mid, ModelBuilds())
        if st.running is not None and build.sha256 == st.running.sha256:
            return {"passed": True, "switched": False, "note": "this build is already running",
                    "build": build.as_dict(), "verdict": None}
        st.candidate = {"build": build.as_dict(), "state": "canary", "source": source, "at": now_iso()}
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
        serving = r.ready and child is not None and url is not None
        old_mem = await asyncio.to_thread(run.memory_of, child.pid) if serving and child is not None else None
        here = await asyncio.to_thread(room, self.cfg.memory_budget_mib)
        budget = self.cfg.memory_budget_mib
        left = None if budget is None or old_mem is None else budget - old_mem.host_mib
        beside, why = canary.fits_beside(old_mem, here, self.limits, left)
        if beside and child is not None and url is not None:
            old_now = run.Running(url, child.pid, old_label, self._slot(target.id))
            tried, measured = await run.try_candidate(candidate, r.machine.effective, build.label(), golden,
                                                      self.timing, r.http, old_now,
                                                      lambda o, n: canary.too_slow(o, n, self.limits))
            old = measured or Measured(old_label, "", (), old_mem)
            return canary.compare(old, tried, self.limits), tried, "beside"
        if serving and child is not None and url is not None:
            old = await run.measure_running(r.http, url, child.pid, old_label, golden, self.timing,
                                            self._slot(target.id))
        else:
            recorded = await asyncio.to_thread(self.book.golden, target.id)
            old = Measured.from_dict(recorded) if recorded else canary.baseline_unknown(golden)
        log.info("canary_in_place", model=target.id, why=why)
        pending = InPlace(candidate, r.loaded, old, golden, build.label(), self)
        new: Measured | None
        self.in_place[target.id] = pending
        try:
            await target.restart_with(candidate, f"upgrade canary: {build.label()} ({why})")
            limit = self.cfg.load_max_s + 2 * self.cfg.warmup_timeout_s
            verdict, new = await asyncio.wait_for(asyncio.shield(pending.done), limit)
        except TimeoutError:
            pending.failed(target, "no verdict in time")
            verdict, new = await pending.done
        finally:
            self.in_place.pop(target.id, None)
        return verdict, new, "in place"

    async def _passed(self, target: Target, candidate: Loaded, before: Loaded, build: Build, verdict: Verdict,
                      new: Measured | None, dry_run: bool, source: str, where: str) -> dict[str, Any]:
        mid = target.id
        st = self.models[mid]
        previous = (before, st.running)
        if dry_run:
            if where == "in place":
                await target.restart_with(before, "upgrade canary: dry run, back to the running build")
            st.candidate = {"build": build.as_dict(), "state": "passed (dry run)", "at": now_iso(),
                            "verdict": verdict.as_dict()}
            self._tell(mid, "passed", build=build.label(), switched=False, verdict=verdict.as_dict(), source=source)
            return {"passed": True, "switched": False, "dry_run": True, "where": where, "verdict": verdict.as_dict()}
        if where != "in place":
            await target.restart_with(candidate, f"upgrade: {build.label()} passed its canary")
        st.previous, st.switched_at, st.running = previous, time.monotonic(), build
        st.candidate = {"build": build.as_dict(), "state": "probation", "at": now_iso(), "verdict": verdict.as_dict(),
                        "probation_s": self.cfg.upgrade_probation_s}
        if st.probation is not None:
            st.probation.cancel()
        golden = new.as_dict() if new is not None else None
        st.probation = asyncio.get_running_loop().call_later(
            self.cfg.upgrade_probation_s, lambda: self.task(self._probation_passed(mid, build, golden, source)))
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
        st.candidate = {**(st.candidate or {}), "state": "good", "at": now_iso()}
        self._tell(mid, "good", build=build.label())

    async def probation_failed(self, target: Target, why: str) -> None:
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
        target.restart_now(old_loaded, f"upgrade rolled back: {bad.label()} {reason}")  # its child is gone already
        st.running = old_build
        await self._record_failure(mid, bad, [reason], None, "probation")

    async def _failed(self, mid: str, build: Build, verdict: Verdict, dry_run: bool, source: str,
                      where: str = "nowhere") -> dict[str, Any]:
        if not dry_run:
            await self._record_failure(mid, build, verdict.reasons, verdict, source)
        else:
            self.models[mid].candidate = {"build": build.as_dict(), "state": "failed (dry run)", "at": now_iso(),
                                          "reasons": verdict.reasons, "verdict": verdict.as_dict()}
        return {"passed": False, "switched": False, "dry_run": dry_run, "where": where, "reasons": verdict.reasons,
                "verdict": verdict.as_dict()}

    async def _record_failure(self, mid: str, build: Build, reasons: list[str], verdict: Verdict | None,
                              source: str) -> None:
        st = self.models.setdefault(mid, ModelBuilds())
        at = now_iso()
        await asyncio.to_thread(self.book.reject, mid, build, reasons, at)
        if source not in ("api", "probation") and st.profile is not None:
            await asyncio.to_thread(self.book.set_seen, mid, st.profile.sha256)
        running = st.running.label() if st.running else "the last good build"
        st.note = f"{build.label()} rolled back ({'; '.join(reasons)[:300]}): serving {running}"
        st.candidate = {"build": build.as_dict(), "state": "rejected", "at": at, "reasons": reasons,
                        "verdict": verdict.as_dict() if verdict else None}
        self._tell(mid, "rejected", build=build.label(), reasons=reasons, running=running,
                   verdict=verdict.as_dict() if verdict else None, source=source)
