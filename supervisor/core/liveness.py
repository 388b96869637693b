"""Liveness decisions: when to probe a ready child, which route reaches its inference loop, and what the
answers mean. Pure: no I/O, no clock (child/liveness.py sends the probes and keeps the time).

llama-server answers `/health` from its HTTP threads without touching the inference loop, which runs on the
main thread: a loop stuck in a driver call or a deadlock leaves `/health` at 200 while every request hangs.
`GET /slots` and `GET /metrics` post a high-priority task to the loop's queue. Outside a decode the main thread
answers it; during a decode (`yield_to_queue` in this build) a worker thread answers it with the slots' state,
so an answer alone does not prove that a decode ever ends. Hence two signs of a hung loop:
- the probe gets no answer within `loop_timeout_s` (the main thread is stuck outside a decode: sampling, a
  deadlock, the queue's own wait);
- it answers, some slot is processing, and the work done (prompt tokens processed plus tokens generated, over
  the slots) has not moved for `loop_timeout_s` (stuck inside a decode: a driver call that never returns).
Either way `loop_timeout_s` must outlast the slowest single batch (a long prompt on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

# Answers that come from the HTTP layer, not the loop: the route is off (--no-slots, no --metrics), locked
# (an --api-key the profile passed through extra_args) or unknown to this build. The next route is tried.
NOT_A_LOOP_ANSWER = frozenset({401, 403, 404, 501})


class Outcome(StrEnum):
    ALIVE = "alive"  # the loop answered (or, with no loop route, /health did)
    EXCUSED = "excused"  # no answer in time, but the child made progress meanwhile: busy, not dead
    FAILED = "failed"  # /health did not answer either: counts toward liveness_failures (`unresponsive`)
    WEDGED = "wedged"  # /health said ok and the loop did not answer within its timeout


@dataclass(frozen=True)
class Answers:
    """What one probe round got. A status is None when no answer came within the probe's timeout (or the
    connection failed); `loop` is None too when no loop route was asked."""

    health: int | None
    loop: int | None
    asked_loop: bool
    progressed: bool  # bytes of any answer came from the child while the probe waited
    streamed: bool  # ... streamed generated text, which only a running loop produces
    still_s: float = 0.0  # how long the loop's work has not moved while some slot was processing (see `pace`)


@dataclass(frozen=True)
class Work:
    """The loop's work as one answer shows it: is any slot processing, and how much has been done."""

    busy: bool
    done: float  # /slots: prompt tokens processed + tokens generated over the slots; /metrics: its counters


@dataclass(frozen=True)
class Pace:
    """The work at the last answer, and since when it has stood still (busy) or the time of that answer."""

    work: Work
    since: float

    def still_s(self, now: float) -> float:
        return now - self.since if self.work.busy else 0.0


def pace(prev: Pace | None, work: Work, now: float) -> Pace:
    """Idle, newly busy, or moving: a fresh start. Busy and unchanged since the last answer: the clock runs on."""
    if prev is not None and work.busy and prev.work.busy and work.done == prev.work.done:
        return prev
    return Pace(work, now)


def loop_routes(argv: Sequence[str]) -> tuple[str, ...]:
    """The routes that make a round trip through the inference loop with this command line, best first.

    `/slots` (on by default) has no side effect. `/metrics` (only with --metrics) resets the averaged gauges
    of llama-server's own metrics at every call, which would skew what `/child/metrics` shows; but while the
    server sleeps (--sleep-idle-seconds) it answers from a cache, where `/slots` would wake the model up: then
    it goes first."""
    args = set(argv)
    slots = "--no-slots" not in args
    metrics = "--metrics" in args
    sleeps = any(a == "--sleep-idle-seconds" or a.startswith("--sleep-idle-seconds=") for a in argv)
    order = [("/metrics", metrics), ("/slots", slots)] if sleeps else [("/slots", slots), ("/metrics", metrics)]
    return tuple(path for path, on in order if on)


def probe_due(idle_s: float, interval_s: float) -> str | None:
    """Why a probe is due now, or None. `idle_s`: since the last byte from the child on any request. A flowing
    answer is proof enough while it flows."""
    if idle_s >= interval_s:
        return f"no progress for {idle_s:.1f}s"
    return None


def judge(a: Answers, limit_s: float) -> Outcome:
    """`limit_s`: loop_timeout_s, also the longest the work may stand still while a slot is processing."""
    health_ok = a.health == 200
    if a.asked_loop and a.loop is not None and a.loop not in NOT_A_LOOP_ANSWER:
        if a.still_s < limit_s or a.streamed:
            return Outcome.ALIVE  # even an error answer came back through the loop's queue
        return Outcome.WEDGED if health_ok else Outcome.FAILED  # answered from inside a decode that never ends
    if health_ok and not (a.asked_loop and a.loop is None):
        return Outcome.ALIVE  # no loop route to ask: /health is all there is
    if health_ok:
        # Answers from the HTTP threads (/tokenize, /props) do not show that the loop runs; generated text does.
        return Outcome.EXCUSED if a.streamed else Outcome.WEDGED
    return Outcome.EXCUSED if a.progressed else Outcome.FAILED


def loop_route_unusable(status: int | None) -> bool:
    """This route answered without reaching the loop: use the next one from now on."""
    return status in NOT_A_LOOP_ANSWER
