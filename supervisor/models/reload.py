"""Loading a profile for real use (schema + binary + argv check) and reloading it when it changes.

A bad edit never replaces a working setup: the error is logged and shown in /status until a good
edit clears it. A good edit restarts the child only when its command line or environment changes.
The files a start depends on (the profile, the settings file, the model, the projector, the binary)
are watched: when one changes while the supervisor is `failed`, it tries again by itself.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import watchfiles

from ..child.runner import Runner
from ..fleet.drain import Drain
from ..spec.loaded import child_identity, load_checked
from ..spec.profile import ProfileError

log = structlog.get_logger("reload")


def active_profile(settings_file: Path | None, overrides: dict[str, Any], current: Path) -> Path:
    """The settings file may name another active profile (with several models: the default): read it again on
    every reload, with the command line's values on top (a --profile given there wins over the file, as at
    start). Blocking."""
    if settings_file is None or "profile" in overrides:
        return current
    from ..spec.settings import ConfigError, load_config

    try:
        return load_config(**overrides).resolved_profile()
    except ConfigError as exc:
        log.warning("settings_invalid", error=str(exc))
        return current


class Reloader:
    def __init__(self, runner: Runner, profile_path: Path, settings_file: Path | None = None,
                 debounce_ms: int = 300, *, overrides: dict[str, Any] | None = None,
                 in_flight: Callable[[], int] = lambda: 0, on_applied: Callable[[], None] = lambda: None,
                 drain: Drain | None = None) -> None:
        self.runner = runner
        self.path = profile_path
        self.settings_file = settings_file
        self.debounce_ms = debounce_ms
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}  # command-line values
        self.in_flight = in_flight
        self.on_applied = on_applied  # the proxy follows the profile (its upstream limit)
        self.drain = drain or Drain()  # a balancer is told to stop sending here before the child restarts
        self.last_error: dict[str, Any] | None = None  # the last rejected reload, until a good one
        self._lock = asyncio.Lock()
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []  # (source, outcome), e.g. the timeline

    def _active_path(self) -> Path:
        return active_profile(self.settings_file, self.overrides, self.path)

    async def reload(self, source: str) -> dict[str, Any]:
        if self.runner.closing:
            log.info("reload_ignored", source=source, why="shutting down")
            return self._refused()
        async with self._lock:  # a burst of triggers is handled one at a time
            if self.runner.closing:
                return self._refused()
            outcome = await self._reload(source)
        for obs in self.observers:
            obs(source, outcome)
        return outcome

    def _refused(self) -> dict[str, Any]:
        return {"ok": False, "restarted": False,
                "error": {"message": "the supervisor is shutting down: reload ignored", "file": str(self.path),
                          "errors": []}}

    async def _reload(self, source: str) -> dict[str, Any]:
        r = self.runner
        path = await asyncio.to_thread(self._active_path)
        try:
            loaded = await asyncio.to_thread(load_checked, path)
        except ProfileError as exc:
            self.last_error = exc.as_dict()
            r.metrics.reloads.labels("invalid").inc()
            log.error("reload_rejected", source=source, file=exc.path, errors=exc.problems,
                      keeping=str(r.loaded.path))
            return {"ok": False, "restarted": False, "error": {"message": str(exc), **exc.as_dict()}}
        self.last_error = None
        changed = child_identity(loaded) != child_identity(r.loaded) or path != r.loaded.path
        if not changed:
            r.apply_profile(loaded)  # supervisor-side settings (images, warmup, ladder floor) apply at once
            self.on_applied()
            r.metrics.reloads.labels("unchanged").inc()
            retried = r.retry_failed(f"files changed ({source})")
            log.info("reload_no_restart", source=source, file=str(path), retry_after_failed=retried)
            return {"ok": True, "restarted": retried}
        self.path = path
        why = "profile change"
        self.drain.begin(why)  # /health 503 and agent `drain`: the balancer stops sending here ...
        try:
            await asyncio.sleep(r.cfg.drain_notice_s)  # ... once it has looked
            await self._drain()
            if r.closing:
                return self._refused()
            r.metrics.reloads.labels("restart").inc()
            log.info("reload_restart", source=source, file=str(path), profile=loaded.profile.name)
            r.replace_profile(loaded)
        finally:
            self.drain.end(why)  # the restart itself keeps the box out (agent `maint`) until it is ready
        self.on_applied()
        return {"ok": True, "restarted": True}

    async def _drain(self) -> None:
        """Let requests in flight finish (bounded) before the child goes away."""
        deadline = asyncio.get_running_loop().time() + self.runner.cfg.drain_s
        while self.in_flight() > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def _targets(self) -> frozenset[Path]:
        """The files a start depends on."""
        p = self.runner.loaded
        files = {self.path, Path(p.caps.binary), Path(p.profile.model)}
        if p.profile.mmproj is not None:
            files.add(Path(p.profile.mmproj))
        if self.settings_file is not None:
            files.add(self.settings_file)
        return frozenset(files)

    async def watch(self) -> None:
        """Watch the folders of the files a start depends on (atomic saves replace a file: its folder sees it).

        When they move (the settings file switches to a profile in another folder, a profile names another
        model), the watch moves with them: the new watcher starts before the old one stops, then one reload
        catches whatever changed in between.
        """
        current: asyncio.Task[None] | None = None
        try:
            while True:
                moved = asyncio.Event()
                task = asyncio.ensure_future(self._watch_files(self._targets(), moved))
                await asyncio.sleep(0)  # lets the new watcher start before the old one goes
                if current is not None:
                    current.cancel()
                    await asyncio.gather(current, return_exceptions=True)
                    await self.reload("watch moved")
                current = task
                await moved.wait()
        finally:
            if current is not None:
                current.cancel()
                await asyncio.gather(current, return_exceptions=True)

    async def _watch_files(self, targets: frozenset[Path], moved: asyncio.Event) -> None:
        wanted = {os.path.abspath(t) for t in targets}  # noqa: ASYNC240 (string work, no file access)
        dirs = await asyncio.to_thread(lambda: sorted({os.path.dirname(t) for t in wanted if os.path.isdir(os.path.dirname(t))}))
        log.debug("watching", dirs=dirs)

        def relevant(_change: watchfiles.Change, p: str) -> bool:
            return p in wanted

        # A change is acted on once the files have been quiet for debounce_ms: a burst of saves is one reload.
        async for _changes in watchfiles.awatch(*dirs, watch_filter=relevant, debounce=max(1600, 4 * self.debounce_ms),
                                                 step=self.debounce_ms, recursive=False):
            await self.reload("file change")
            if self._targets() != targets:
                moved.set()
