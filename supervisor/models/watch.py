"""Hot reload: the one reloader, for a folder of profiles or a single profile file (a folder of one).

A new profile file appears in /v1/models; a removed one is drained and unloaded; an edited one restarts only
that model, and only if it is loaded and llama-server's command line or environment changed (a model /health
answers for is first taken out of the balancer's pool: /health 503 and agent `drain` for drain_notice_s). A
file that does not validate changes nothing that runs; its error is shown until a good edit clears it. The
files a start depends on (profiles, the settings file, models, projectors, binaries) are watched: a profile
rejected for a missing file is read again when it appears, and a failed model is tried again when one changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import watchfiles

from ..fleet.drain import Drain
from ..spec.loaded import Loaded, load_checked, same_child
from ..spec.profile import ProfileError
from ..spec.settings import ConfigError, load_config
from .catalog import Catalog, scan
from .pool import Pool

log = structlog.get_logger("reload")


def active_profile(settings_file: Path | None, overrides: dict[str, Any], current: Path) -> Path:
    """The settings file may name another default profile: read it again on every reload, with the command
    line's values on top (a --profile given there wins over the file, as at start). Blocking."""
    if settings_file is None or "profile" in overrides:
        return current
    try:
        return load_config(**overrides).resolved_profile()
    except ConfigError as exc:
        log.warning("settings_invalid", error=str(exc))
        return current


class Reloader:
    def __init__(self, pool: Pool, folder: Path | None, default_path: Path, settings_file: Path | None = None,
                 overrides: dict[str, Any] | None = None, drain: Drain | None = None, debounce_ms: int = 300) -> None:
        self.pool, self.folder, self.default_path, self.debounce_ms = pool, folder, default_path, debounce_ms
        # The settings file names the default (`profile:`), unless the command line did (--profile wins).
        self.settings_file = settings_file
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.drain = drain or Drain()  # a balancer is told to stop sending here before a model it counts restarts
        self.last_error: dict[str, Any] | None = None  # a rejected file of the last reload (the default's first)
        self._lock = asyncio.Lock()
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []  # told of every outcome (the ops page)
        # Before a reload applies: each may replace a model's Loaded (the upgrades run the last good build).
        self.before_apply: list[Callable[[Catalog], Awaitable[None]]] = []
        self.more_files: list[Callable[[], dict[str, set[str]]]] = []  # more files to watch ("" → reload)
        # Whether someone else owns a model's child now (an upgrade under way): asked as each model is applied,
        # after every await of the reload; such a model is left alone and its owner reloads once done.
        self.held: Callable[[str], bool] = lambda _mid: False

    async def reload(self, source: str) -> dict[str, Any]:
        pool = self.pool
        if pool.stopping:
            log.info("reload_ignored", source=source, why="shutting down")
            return _refused(self.default_path)
        async with self._lock:  # a burst of triggers is handled one at a time
            if pool.stopping:
                return _refused(self.default_path)
            outcome = await self._reload(source)
        for observer in self.observers:
            observer(source, outcome)
        return outcome

    async def _reload(self, source: str) -> dict[str, Any]:
        pool = self.pool
        metrics = pool.metrics.reloads
        default = pool.models[pool.default].loaded
        path = await asyncio.to_thread(active_profile, self.settings_file, self.overrides, self.default_path)
        rejected: dict[str, Any] | None = None
        try:
            fresh_default = await asyncio.to_thread(load_checked, path)
        except ProfileError as exc:
            log.error("reload_rejected", source=source, file=exc.path, errors=exc.problems,
                      keeping=str(default.path))
            fresh_default, path = default, self.default_path  # the default keeps running as it is
            rejected = exc.as_dict()
            if len(pool.models) > 1 or self.folder is not None:
                rejected["errors"].append({"field": "", "message": f"kept out: the default stays {default.path}"})
        catalog = await asyncio.to_thread(scan, self.folder, fresh_default)
        for hook in self.before_apply:
            await hook(catalog)
        if rejected is not None:
            catalog.errors[str(rejected["file"])] = rejected
        added = [mid for mid in catalog.models if mid not in pool.models]
        removed: list[str] = []
        restarted: list[str] = []
        updated: list[str] = []
        deferred: list[str] = []
        # A new default first (its model made now if it is new): nothing below may leave pool.default naming a
        # model that is gone, and the old default may be among those removed.
        switched = fresh_default.profile.name != pool.default
        if switched:
            pool.set_catalog(catalog)
            pool.set_default(fresh_default.profile.name)
        for mid in list(pool.models):
            if mid not in catalog.models:
                removed.append(mid)
                await pool.remove(mid)
        for mid, loaded in catalog.models.items():
            model = pool.models.get(mid)
            if model is None or mid in added:
                continue
            if mid in catalog.held or self.held(mid):
                deferred.append(mid)
            elif not same_child(loaded, model.loaded):
                restarted.append(mid)
                await self.restart(mid, loaded, source)
            else:
                if loaded.profile != model.loaded.profile:
                    updated.append(mid)
                    await pool.update(mid, loaded)  # supervisor-side settings (images, pinned, ttl_s, aliases) now
                pool.retry_failed(mid, f"reload ({source})")  # a reload is also "try again" for a failed model
        pool.set_catalog(catalog)
        self.default_path = path
        for mid in added:
            await pool.add(mid)
        pool.wake()
        for mid in catalog.models:
            metrics.labels("restart" if mid in restarted else "update" if mid in updated else "unchanged").inc()
        errors = list(catalog.errors.values())
        for _ in errors:
            metrics.labels("invalid").inc()
        self.last_error = (rejected or errors[0]) if errors else None
        outcome: dict[str, Any] = {"ok": not errors, "added": added, "removed": removed, "restarted": restarted,
                                   "updated": updated, "deferred": deferred, "errors": errors, "default": pool.default,
                                   "default_changed": switched}
        if errors:
            first = rejected or errors[0]
            outcome["error"] = {"message": "; ".join(f"{first['file']}: {e['field']}: {e['message']}"
                                                     for e in first["errors"]), **first}
        log.info("reload", source=source, **{k: v for k, v in outcome.items() if v and k != "error"})
        return outcome

    async def restart(self, mid: str, loaded: Loaded, source: str, why: str = "profile change") -> None:
        """An edit that changes the child. A model /health answers for (the default, a pinned one) first leaves
        the balancer's pool, once it has looked; the model then holds new requests while those in flight finish."""
        pool, cfg = self.pool, self.pool.cfg
        counted = mid == pool.default or loaded.profile.pinned
        log.info("reload_restart", source=source, model=mid, file=str(loaded.path))
        if counted and self.drain.begin(why):
            try:
                await asyncio.sleep(cfg.drain_notice_s)
                await pool.replace(mid, loaded, cfg.drain_s)
            finally:
                self.drain.end(why)  # the restart itself keeps the box out (agent `maint`) until it is ready
        else:
            await pool.replace(mid, loaded, cfg.drain_s)

    def _depends(self) -> dict[str, set[str]]:
        """Each file a start depends on → who needs it: the models (model, projector, binary) and, as "", the
        rejected profiles that name it (a model file missing or half copied when the folder was read)."""
        deps: dict[str, set[str]] = {}
        for mid, model in self.pool.models.items():
            p = model.loaded.profile
            for f in (p.model, p.mmproj, model.loaded.caps.binary):
                if f is not None:
                    deps.setdefault(os.path.abspath(f), set()).add(mid)
        for files in self.pool.waiting_on.values():
            for f in files:
                deps.setdefault(f, set()).add("")
        for more in self.more_files:
            for f, mids in more().items():
                deps.setdefault(f, set()).update(mids)
        return deps

    async def watch(self) -> None:
        """Watch the profiles and the files each start depends on; the watch moves when a reload changes which
        files those are."""
        while True:
            try:
                await self._watch(self._depends(), os.path.abspath(self.default_path))  # noqa: ASYNC240
            except Exception as exc:  # a bug here must not end hot reload for good
                log.error("watch_error", error=repr(exc), exc_info=exc)
                await asyncio.sleep(1.0)
            # Whatever changed while no watch ran (moving to other files, or after an error) is caught here.
            with contextlib.suppress(Exception):
                await self.reload("watch moved")

    async def _watch(self, deps: dict[str, set[str]], default: str) -> None:
        # watchfiles reports absolute paths: a relative folder must compare as one too (string work, no I/O).
        folder = os.path.abspath(self.folder) if self.folder is not None else None  # noqa: ASYNC240
        settings = os.path.abspath(self.settings_file) if self.settings_file is not None else None  # noqa: ASYNC240
        wanted = [default, settings or "", *deps]
        dirs = await asyncio.to_thread(lambda: sorted(
            {d for d in map(os.path.dirname, wanted) if os.path.isdir(d)} | ({folder} if folder else set())))
        log.debug("watching", dirs=dirs)

        def profile(p: str) -> bool:
            return p in (default, settings) or (p.endswith(".yaml") and os.path.dirname(p) == folder)

        # A change is acted on once the files have been quiet for debounce_ms: a burst of saves is one reload.
        async for changes in watchfiles.awatch(*dirs, watch_filter=lambda _c, p: profile(p) or p in deps,
                                               debounce=max(1600, 4 * self.debounce_ms), step=self.debounce_ms,
                                               recursive=False):
            paths = {p for _, p in changes}
            if any(profile(p) or "" in deps.get(p, ()) for p in paths):
                await self.reload("file change")
            for p in paths & deps.keys():
                for mid in sorted(deps[p] - {""}):
                    self.pool.retry_failed(mid, p)
            if self._depends().keys() != deps.keys() or os.path.abspath(self.default_path) != default:  # noqa: ASYNC240
                return  # other files now: watch those


def _refused(path: Path) -> dict[str, Any]:
    message = "the supervisor is shutting down: reload ignored"
    return {"ok": False, "added": [], "removed": [], "restarted": [], "updated": [], "deferred": [],
            "errors": [], "error": {"message": message, "file": str(path), "errors": []}}
