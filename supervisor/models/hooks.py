"""What the pool hangs on each model's runner: a watch that wakes the pool and measures a child once it is
ready, and the systemd notifier through which only the default model speaks for the box."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from ..core.lifecycle import Machine, State
from ..host import room
from ..host.sdnotify import Notifier

if TYPE_CHECKING:
    from ..child.view import RunnerCore
    from .model import Model

log = structlog.get_logger("pool")


class Watch:
    """A runner observer: wakes the pool on every state change; once a child is ready, measures what it really
    holds (residency uses that from then on, not the estimate) and asks llama-server its slot count."""

    def __init__(self, model: Model, wake: Callable[[], None], task: Callable[[Coroutine[Any, Any, None]], None]
                 ) -> None:
        self.model, self.wake, self.task = model, wake, task

    def machine_changed(self, runner: RunnerCore, old: Machine, new: Machine) -> None:
        if new.state is old.state:
            return
        if new.state is State.READY:
            self.task(self._measure(new.gen))
            self.task(self._ask_slots(new.gen))
        self.wake()

    def child_lines(self, runner: RunnerCore, gen: int, lines: list[str]) -> None:
        pass

    async def _measure(self, gen: int) -> None:
        model, runner = self.model, self.model.runner
        child = runner.child
        if child is None:
            return
        mem = await asyncio.to_thread(room.measure, child.pid)
        # A child that stopped being ready while it was measured (an unload, a crash) is measured mid-teardown:
        # keep the figure only for the child that is still serving.
        if mem is not None and runner.machine.gen == gen and runner.ready and not model.unloading:
            model.measured = mem
            log.info("model_measured", model=model.id, gpu_mib=mem.gpu_mib, host_mib=mem.host_mib,
                     estimate_gpu_mib=model.estimate.gpu_mib, estimate_host_mib=model.estimate.host_mib)
        self.wake()

    async def _ask_slots(self, gen: int) -> None:
        """llama-server's own slot count (/props): HAProxy's agent weighs the box by it."""
        runner = self.model.runner
        url = runner.child_url
        if url is None:
            return
        try:
            resp = await runner.http.get(f"{url}/props", timeout=2.0)
            total = int(resp.json()["total_slots"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("slots_unknown", model=self.model.id, error=repr(exc))
            return
        if runner.machine.gen == gen and total > 0:
            self.model.total_slots = (gen, total)


class BoxNotifier(Notifier):
    """systemd hears about the box from its default model only, and never STOPPING=1 or the states of an
    unload: evicting a model is not the service stopping (the daemon sends STOPPING=1 itself at shutdown).
    Which model is the default is read at each message: the settings file may name another one."""

    def __init__(self, box: Notifier, speaks: Callable[[], bool]) -> None:
        super().__init__({})
        self.box, self.speaks = box, speaks  # speaks: is this model the default, and not being unloaded?
        self.address, self.watchdog_s = box.address, box.watchdog_s
        self.note = ""  # said after every STATUS= (an upgrade rolled back: `systemctl status` shows why)
        self._status = "STATUS=starting"

    def send(self, *fields: str) -> bool:
        if not self.speaks() or any(f == "STOPPING=1" for f in fields):
            return False
        fields = tuple(self._noted(f) for f in fields)
        return self.box.send(*fields)

    def _noted(self, field: str) -> str:
        if not field.startswith("STATUS="):
            return field
        self._status = field
        return f"{field}; {self.note}"[:400] if self.note else field

    def set_note(self, note: str) -> None:
        """Say `note` with the status from now on, and at once."""
        self.note = note
        self.send(self._status)

    def close(self) -> None:
        pass
