"""Reloading the active profile when it changes (file watch, SIGHUP, /admin/reload).

A bad edit never replaces a working setup: the error is logged and shown in /status until a good
edit clears it. A good edit restarts the child only when its command line or environment changes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog
import watchfiles

from .child.runner import Runner
from .loading import child_identity, load_checked
from .profile import ProfileError

log = structlog.get_logger("reload")


class Reloader:
    def __init__(self, runner: Runner, profile_path: Path, settings_file: Path | None = None,
                 debounce_ms: int = 300) -> None:
        self.runner = runner
        self.path = profile_path
        self.settings_file = settings_file
        self.debounce_ms = debounce_ms
        self._lock = asyncio.Lock()

    def _active_path(self) -> Path:
        """The settings file may name another active profile: read it again on every reload."""
        if self.settings_file is None:
            return self.path
        from .config import ConfigError, load_config

        try:
            return load_config().resolved_profile()
        except ConfigError as exc:
            log.warning("settings_invalid", error=str(exc))
            return self.path

    async def reload(self, source: str) -> dict[str, Any]:
        async with self._lock:  # a burst of triggers is handled one at a time
            return await self._reload(source)

    async def _reload(self, source: str) -> dict[str, Any]:
        r = self.runner
        path = await asyncio.to_thread(self._active_path)
        try:
            loaded = await asyncio.to_thread(load_checked, path)
        except ProfileError as exc:
            r.last_reload_error = exc.as_dict()
            r.metrics.reloads.labels("invalid").inc()
            log.error("reload_rejected", source=source, file=exc.path, errors=exc.problems,
                      keeping=str(r.loaded.path))
            return {"ok": False, "restarted": False, "error": {"message": str(exc), **exc.as_dict()}}
        r.last_reload_error = None
        changed = child_identity(loaded) != child_identity(r.loaded) or path != r.loaded.path
        if not changed:
            r.loaded = loaded  # supervisor-side settings (images, warmup) apply at once
            r.metrics.reloads.labels("unchanged").inc()
            log.info("reload_no_restart", source=source, file=str(path))
            return {"ok": True, "restarted": False}
        self.path = path
        await self._drain()
        r.metrics.reloads.labels("restart").inc()
        log.info("reload_restart", source=source, file=str(path), profile=loaded.profile.name)
        r.replace_profile(loaded)
        return {"ok": True, "restarted": True}

    async def _drain(self) -> None:
        """Let requests in flight finish (bounded) before the child goes away."""
        deadline = asyncio.get_running_loop().time() + self.runner.cfg.drain_s
        while self.runner.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def watch(self) -> None:
        """Watch the active profile's folder (atomic saves replace the file) and the settings file's.

        When the settings file switches to a profile in another folder, the watch moves with it: the new
        watcher starts before the old one stops, then one reload catches whatever changed in between.
        """
        current: asyncio.Task[None] | None = None
        try:
            while True:
                moved = asyncio.Event()
                task = asyncio.ensure_future(self._watch_folders(self.path.parent, moved))
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

    async def _watch_folders(self, folder: Path, moved: asyncio.Event) -> None:
        dirs = {str(folder)} | ({str(self.settings_file.parent)} if self.settings_file else set())
        log.debug("watching", dirs=sorted(dirs))

        def relevant(_change: watchfiles.Change, p: str) -> bool:
            names = {self.path.name} | ({self.settings_file.name} if self.settings_file else set())
            return Path(p).name in names

        # A change is acted on once the files have been quiet for debounce_ms: a burst of saves is one reload.
        async for _changes in watchfiles.awatch(*dirs, watch_filter=relevant, debounce=max(1600, 4 * self.debounce_ms),
                                                 step=self.debounce_ms, recursive=False):
            await self.reload("file change")
            if self.path.parent != folder:
                moved.set()
