"""Serving every profile in profiles_dir: the pool's wiring, and hot reload per file.

A new profile file appears in /v1/models; a removed one is drained and unloaded; an edited one restarts
only that model, and only if it is loaded and llama-server's command line or environment changed. A
file that does not validate changes nothing that runs; its error is shown until a good edit clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import watchfiles

from ..core.lifecycle import State
from ..host import gpu, room
from ..host.sdnotify import Notifier
from ..spec.loaded import Loaded, child_identity, load_checked
from ..spec.profile import ProfileError
from ..spec.settings import Config
from .catalog import Catalog, scan
from .pool import Pool
from .reload import active_profile

log = structlog.get_logger("reload")


def build(cfg: Config, default: Loaded, catalog: Catalog, notifier: Notifier, settings_file: Path | None = None,
          overrides: dict[str, Any] | None = None) -> tuple[Pool, FolderReloader]:
    assert cfg.profiles_dir is not None
    pool = Pool(cfg, catalog, default.profile.name, notifier=notifier)
    pool.metrics.attach_sampler(lambda: {"gpus": [g.as_dict() for g in gpu.snapshot()]})
    return pool, FolderReloader(pool, Path(cfg.profiles_dir), default.path, settings_file, overrides or {})


class FolderReloader:
    def __init__(self, pool: Pool, folder: Path, default_path: Path, settings_file: Path | None = None,
                 overrides: dict[str, Any] | None = None, debounce_ms: int = 300) -> None:
        self.pool, self.folder, self.default_path, self.debounce_ms = pool, folder, default_path, debounce_ms
        # The settings file names the default (`profile:`), unless the command line did (--profile wins).
        self.settings_file = settings_file
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self._lock = asyncio.Lock()
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []  # told of every outcome (the ops page)

    async def reload(self, source: str) -> dict[str, Any]:
        async with self._lock:
            return await self._reload(source)

    async def _reload(self, source: str) -> dict[str, Any]:
        pool = self.pool
        default = pool.slots[pool.default].loaded
        path = await asyncio.to_thread(active_profile, self.settings_file, self.overrides, self.default_path)
        rejected: dict[str, Any] | None = None
        try:
            fresh_default = await asyncio.to_thread(load_checked, path)
        except ProfileError as exc:
            log.error("reload_rejected", source=source, file=exc.path, errors=exc.problems,
                      keeping=str(default.path))
            fresh_default, path = default, self.default_path  # the default keeps running as it is
            rejected = exc.as_dict()
            rejected["errors"].append({"field": "", "message": f"kept out: the default stays {default.path}"})
        catalog = await asyncio.to_thread(scan, self.folder, fresh_default)
        if rejected is not None:
            catalog.errors[str(rejected["file"])] = rejected
        added = [mid for mid in catalog.models if mid not in pool.slots]
        removed, restarted, updated = [], [], []
        # A new default first (its slot made now if it is new): nothing below may leave pool.default naming a
        # model that is gone, and the old default may be among those removed.
        switched = fresh_default.profile.name != pool.default
        if switched:
            pool.set_catalog(catalog)
            pool.set_default(fresh_default.profile.name)
        for mid in list(pool.slots):
            if mid not in catalog.models:
                removed.append(mid)
                await self._remove(mid)
        for mid, loaded in catalog.models.items():
            slot = pool.slots.get(mid)
            if slot is None or mid in added:
                continue
            if loaded.path != slot.loaded.path or child_identity(loaded) != child_identity(slot.loaded):
                restarted.append(mid)
                await self._replace(mid, loaded)
            elif loaded.profile != slot.loaded.profile:
                updated.append(mid)
                slot.loaded = loaded  # supervisor-side settings (images, pinned, ttl_s, aliases) at once
                if slot.runner is not None and slot.proxy is not None:
                    slot.runner.apply_profile(loaded)
                    slot.proxy.sync_profile()
        pool.set_catalog(catalog)
        self.default_path = path
        for mid in added:
            slot = pool.slots[mid]
            slot.estimate = await asyncio.to_thread(room.estimate, slot.loaded.profile)
            p = slot.loaded.profile
            if p.pinned or p.preload:
                pool.request_load(mid, "pinned" if p.pinned else "preload")
        pool.wake()
        outcome = {"ok": not catalog.errors, "added": added, "removed": removed, "restarted": restarted,
                   "updated": updated, "errors": list(catalog.errors.values()),
                   "default": pool.default, "default_changed": switched}
        log.info("reload_folder", source=source, **{k: v for k, v in outcome.items() if v})
        for observer in self.observers:
            observer(source, outcome)
        return outcome

    async def _remove(self, mid: str) -> None:
        """A profile file is gone: drain its model (requests in flight finish, bounded by drain_s), unload it,
        forget it. Residency unloads only a ready model: one failed or still starting is unloaded here."""
        pool = self.pool
        slot = pool.slots[mid]
        loop = asyncio.get_running_loop()
        if slot.runner is not None and slot.runner.ready and pool.request_unload(mid, "reload"):
            deadline = loop.time() + pool.cfg.drain_s + pool.cfg.stop_timeout_s
            while slot.runner is not None and loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.changed.wait(), deadline - loop.time())
        if slot.runner is not None:
            await pool.unload(mid, "reload", "profile removed")
        pool.slots.pop(mid)
        slot.notify()  # its waiting requests learn it is gone

    async def _replace(self, mid: str, loaded: Loaded) -> None:
        slot = self.pool.slots[mid]
        runner = slot.runner
        slot.loaded = loaded
        slot.measured = None  # new settings: measure again
        slot.estimate = await asyncio.to_thread(room.estimate, loaded.profile)
        if runner is None:
            return
        deadline = asyncio.get_running_loop().time() + self.pool.cfg.drain_s
        slot.holding = True  # new requests wait while the ones in flight finish
        try:
            while slot.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            runner.replace_profile(loaded)
        finally:
            slot.holding = False
            slot.notify()

    def _depends(self) -> dict[str, set[str]]:
        """Each file a start depends on → who needs it: the models (model, projector, binary) and, as "", the
        rejected profiles that name it (a model file missing or half copied when the folder was read)."""
        deps: dict[str, set[str]] = {}
        for mid, slot in self.pool.slots.items():
            p = slot.loaded.profile
            for f in (p.model, p.mmproj, slot.loaded.caps.binary):
                if f is not None:
                    deps.setdefault(os.path.abspath(f), set()).add(mid)
        for files in self.pool.waiting_on.values():
            for f in files:
                deps.setdefault(f, set()).add("")
        return deps

    def _retry_failed(self, mids: set[str], changed: str) -> None:
        for mid in sorted(mids):
            slot = self.pool.slots.get(mid)
            if slot is not None and slot.runner is not None and slot.runner.machine.state is State.FAILED:
                log.info("retry_failed_model", model=mid, changed=changed)
                self.pool.request_load(mid, "file change")

    async def watch(self) -> None:
        """The folder's profiles, and the files each start depends on, as with one model: a profile rejected
        for a missing model file is read again when that file appears, and a model that failed to start (a
        corrupt file, a broken binary) is tried again when one of its files changes. The watch moves when a
        reload changes which files those are."""
        while True:
            try:
                await self._watch(self._depends())
            except Exception as exc:  # a bug here must not end hot reload for good
                log.error("watch_error", error=repr(exc), exc_info=exc)
                await asyncio.sleep(1.0)
            # Whatever changed while no watch ran (moving to other files, or after an error) is caught here.
            with contextlib.suppress(Exception):
                await self.reload("watch moved")

    async def _watch(self, deps: dict[str, set[str]]) -> None:
        # watchfiles reports absolute paths: a relative profiles_dir must compare as one too. (abspath is string
        # work, no file access.)
        profile_dirs = {os.path.abspath(self.folder), os.path.abspath(self.default_path.parent)}  # noqa: ASYNC240
        settings = os.path.abspath(self.settings_file) if self.settings_file is not None else None  # noqa: ASYNC240
        dirs = await asyncio.to_thread(lambda: sorted(
            profile_dirs | {d for d in map(os.path.dirname, [*deps, settings or ""]) if os.path.isdir(d)}))

        def profile(p: str) -> bool:
            return (p.endswith(".yaml") and os.path.dirname(p) in profile_dirs) or p == settings

        async for changes in watchfiles.awatch(*dirs, watch_filter=lambda _c, p: profile(p) or p in deps,
                                               debounce=max(1600, 4 * self.debounce_ms), step=self.debounce_ms,
                                               recursive=False):
            paths = {p for _, p in changes}
            if any(profile(p) or "" in deps.get(p, ()) for p in paths):
                await self.reload("file change")
            for p in paths & deps.keys():
                self._retry_failed(deps[p] - {""}, p)
            if self._depends().keys() != deps.keys() or os.path.abspath(self.default_path.parent) not in profile_dirs:  # noqa: ASYNC240
                return  # other files now: watch those
