"""The timeline: a bounded ring of what happened to each model (state changes, exits, ladder steps,
reloads, swaps on a box with several models), longer than the Machine's own 20-transition history, and the
child's log lines for the log ring.

It is fed from the runner's one dispatch point (old and new Machine), from reload outcomes and from the
pool's swap steps, so it never decides anything: it only writes down what the state machine and the pool did.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ..core.crash import signal_name
from .logring import LogRing

if TYPE_CHECKING:
    from ..child.view import RunnerCore
    from ..core.lifecycle import Machine

log = structlog.get_logger("telemetry")
EVENTS_MAX = 1000
# llama-server's own prefix (with timestamps on): "0.01.793.723 W slot ..."
_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([DIWE]) ")
_PREFIX_LEVELS = {"D": "debug", "I": "info", "W": "warning", "E": "error"}
_ERROR = re.compile(r"\b(error|failed|fatal|abort|out of memory|exception)\b", re.IGNORECASE)
_WARN = re.compile(r"\b(warn|warning)\b", re.IGNORECASE)


def wall(mono: float) -> float:
    """Monotonic seconds (the state machine's clock) → Unix time."""
    return time.time() - (time.monotonic() - mono)


def child_level(line: str) -> str:
    """llama-server's level letter when the line has one, else a guess from the words."""
    if m := _PREFIX.match(line):
        return _PREFIX_LEVELS[m.group(1)]
    if _ERROR.search(line):
        return "error"
    if _WARN.search(line):
        return "warning"
    return "info"


class Timeline:
    """Events as dicts: id (increasing), t (Unix seconds), model, kind, title, detail and kind's fields."""

    def __init__(self, logs: LogRing, maxlen: int = EVENTS_MAX) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.exits: dict[str, Counter[str]] = {}
        self.logs = logs
        self._ids = itertools.count(1)
        self._rejected: dict[str, str] = {}  # file → its problems, as last written down (folder reloads)

    def add(self, model: str, kind: str, title: str, detail: str = "", t: float | None = None,
            **fields: Any) -> None:
        self.events.append({"id": next(self._ids), "t": round(time.time() if t is None else t, 3), "model": model,
                            "kind": kind, "title": title, "detail": detail, **fields})

    def after(self, after_id: int, limit: int = EVENTS_MAX) -> list[dict[str, Any]]:
        return [e for e in self.events if e["id"] > after_id][-limit:]

    # ---- observer of the runner (see Runner.observers) --------------------------------------------

    def machine_changed(self, runner: RunnerCore, old: Machine, new: Machine) -> None:
        try:  # called inside the runner's dispatch: a bug here must not stop the supervisor
            self._record(runner.loaded.profile.name, old, new)
        except Exception as exc:  # noqa: BLE001
            log.error("timeline_error", error=repr(exc))

    def _record(self, model: str, old: Machine, new: Machine) -> None:
        ex = new.last_exit
        if ex is not None and ex is not old.last_exit:
            self.exits.setdefault(model, Counter())[ex.cause.value] += 1
            sig = signal_name(ex.returncode)
            how = sig or (f"code {ex.returncode}" if ex.returncode is not None else "")
            self.add(model, "exit", f"exit: {ex.cause.value}" + (f" ({how})" if how else ""), ex.detail,
                     t=wall(ex.at), cause=ex.cause.value, returncode=ex.returncode, signal=sig, gen=old.gen)
        t = new.history[-1] if new.history else None
        if t is not None and (not old.history or t is not old.history[-1]):
            self.add(model, "state", f"{t.src.value} → {t.dst.value}", t.detail, t=wall(t.at), cause=t.cause,
                     src=t.src.value, dst=t.dst.value, gen=new.gen)
        if new.effective != old.effective or new.adjustment != old.adjustment:
            changed = {k: [v, new.effective.as_dict()[k]] for k, v in old.effective.as_dict().items()
                       if new.effective.as_dict()[k] != v}
            title = "ladder step" if new.adjustment and new.adjustment != old.adjustment else "settings"
            if not new.adjustment and old.adjustment:
                title = "back to profile settings"
            self.add(model, "ladder", title, new.adjustment or "", changed=changed)

    def child_lines(self, runner: RunnerCore, gen: int, lines: list[str]) -> None:
        self.logs.extend("child", [(child_level(line), line) for line in lines], model=runner.loaded.profile.name)

    # ---- swap steps (see Pool.on_swap) -------------------------------------------------------------

    def swapped(self, model: str, action: str, cause: str, detail: str) -> None:
        """A load, drain, unload or refusal decided by the pool, with what caused it (request, lru, ttl, admin...)."""
        self.add(model, "swap", f"{action}: {cause}", detail, action=action, cause=cause)

    # ---- upgrades (see models/upgrade.py's observers) -------------------------------------------------

    def upgraded(self, model: str, event: str, details: dict[str, Any]) -> None:
        """A canary began, a build was switched to, rejected, rolled back or became the last good one. The
        comparison table goes with the verdict (`verdict.rows`), for the page to show."""
        build = details.get("build", "")
        titles = {"canary": f"upgrade: canary of {build}", "switched": f"upgrade: switched to {build}",
                  "passed": f"upgrade: {build} passed (dry run)", "rejected": f"upgrade: {build} rejected",
                  "good": f"upgrade: {build} is the last good build"}
        detail = "; ".join(details.get("reasons") or [])
        if event == "rejected":
            detail = f"{detail} (serving {details.get('running', 'the last good build')})"
        self.add(model, "upgrade", titles.get(event, f"upgrade: {event}"), detail, event=event,
                 **{k: v for k, v in details.items() if k not in ("reasons",)})

    # ---- reload outcomes (see Reloader.observers) ---------------------------------------------------

    def reloaded(self, source: str, outcome: dict[str, Any]) -> None:
        """A reload: one event per model it touched, and one per file it rejected; an operator's reload that
        changed nothing says so on the default model."""
        titles = {"added": "reload: added", "removed": "reload: removed", "restarted": "reload: restart",
                  "updated": "reload: applied, no restart",
                  "deferred": "reload: left to the upgrade under way, done again after it"}
        touched = False
        for key, title in titles.items():
            for model in outcome.get(key) or []:
                touched = True
                self.add(model, "reload", title, "", source=source, ok=True, restarted=key == "restarted")
        if not touched and outcome.get("ok") and source in ("api", "SIGHUP") and outcome.get("default"):
            self.add(outcome["default"], "reload", "reload: no change", "", source=source, ok=True, restarted=False)
        # A file still bad at the next reload (reloads also come from the files a rejected profile names, e.g.
        # every few seconds while a model is copied in) is written down again only when its errors change.
        seen = {}
        for err in outcome.get("errors") or []:
            file = str(err.get("file", ""))
            seen[file] = problems = "; ".join(f"{p.get('field', '')}: {p.get('message', '')}"
                                              for p in err.get("errors", []) if isinstance(p, dict))
            if self._rejected.get(file) != problems:
                self.add(Path(file).stem, "reload", "reload rejected", f"{file}: {problems}", source=source,
                         ok=False)
        self._rejected = seen
