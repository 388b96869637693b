"""Climbing back to the profile's settings after the out-of-memory ladder lowered them (core/climb.py decides).

At start, learned reduced settings are checked against the VRAM free now; while ready on reduced
settings, every `climb_interval_s` with no request in flight or waiting, the child is restarted higher
when the estimate says more fits. A climb that runs out of memory goes straight back to what ran before
(the machine keeps it) and is not tried again for `climb_retry_s`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import structlog

from ..core import climb
from ..core.ladder import RunSettings
from ..core.lifecycle import Climb, State
from . import vram

if TYPE_CHECKING:
    from .view import RunnerCore

log = structlog.get_logger("supervisor")


class Climber:
    def __init__(self, runner: RunnerCore) -> None:
        self.r = runner
        cfg = runner.cfg
        self.policy = climb.ClimbPolicy(enabled=cfg.climb == "auto", retry_after_s=cfg.climb_retry_s)
        self._last: dict[str, Any] | None = None  # the last check, for /status

    def status(self) -> dict[str, Any]:
        m = self.r.machine
        failed = None
        if m.climb_failed is not None:
            target, at = m.climb_failed
            failed = {"settings": target.as_dict(), "retry_in_s": round(max(0.0, at + self.policy.retry_after_s
                                                                             - time.monotonic()), 1)}
        return {"mode": self.r.cfg.climb, "interval_s": self.r.cfg.climb_interval_s, "last_check": self._last,
                "failed_climb": failed}

    async def at_start(self, base: RunSettings, learned: RunSettings) -> tuple[RunSettings, str] | None:
        """Learned settings below the profile's: start higher when the VRAM free now fits more."""
        r = self.r
        if not self.policy.enabled or not climb.is_reduced(base, learned, r.model_layers):
            return None
        fit, figures = await vram.fit_now(r.loaded.profile, base.ctx_size, caps=r.loaded.caps)
        decision = climb.decide(base, learned, fit, now=time.monotonic(), policy=self.policy, failed=None)
        self._note("start", learned, figures, decision)
        return decision

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.r.cfg.climb_interval_s)
            await self.check()

    async def check(self) -> bool:
        """One periodic check; True when it asked for a climb."""
        r = self.r
        m = r.machine
        if not self.policy.enabled or m.state is not State.READY or r.traffic() > 0:
            return False
        if not climb.is_reduced(m.base, m.effective, r.model_layers):
            return False
        child = r.child
        fit, figures = await vram.fit_now(r.loaded.profile, m.base.ctx_size, child.pid if child else None,
                                          caps=r.loaded.caps)
        now_m = r.machine
        if now_m.gen != m.gen or now_m.state is not State.READY or r.traffic() > 0:
            return False  # things moved while NVML was read
        decision = climb.decide(m.base, m.effective, fit, now=time.monotonic(), policy=self.policy,
                                failed=m.climb_failed)
        self._note("ready", m.effective, figures, decision)
        if decision is None:
            return False
        settings, why = decision
        r.metrics.climbs.inc()
        r.dispatch(Climb(time.monotonic(), m.gen, settings, why))
        return True

    def _note(self, when: str, current: RunSettings, figures: dict[str, Any] | None,
              decision: tuple[RunSettings, str] | None) -> None:
        self._last = {"when": when, "at_unix": round(time.time(), 3), "current": current.as_dict(),
                      "estimate": figures, "climb_to": decision[0].as_dict() if decision else None}
        if decision is not None:
            log.info("climb", when=when, current=current.as_dict(), target=decision[0].as_dict(), detail=decision[1],
                     estimate=figures)
        else:
            log.debug("climb_check", when=when, current=current.as_dict(), estimate=figures, climb=False)
