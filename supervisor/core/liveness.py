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
  the slots) has not moved for `loop_timeout_s` (stuck inside a decode: a driver call that never returns) while
  llama-server used almost no CPU: a long batch computes (the CPU backend on its threads; a GPU decode waits in
  the driver, often spinning), a hung one sleeps. Still for STILL_CAP times the timeout is a hang whatever the
  CPU does (a driver spinning on a dead GPU).
`loop_timeout_s` should outlast the slowest single batch (a long prompt on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

# Answers that come from the HTTP layer, not the loop: the route is off (--no-slots, no --metrics), locked
# (an --api-key the profile passed through extra_args) or unknown to this build. The next route is tried.
NOT_A_LOOP_ANSWER = frozenset({401, 403, 404, 501})
BUSY_CPU_SHARE = 0.05  # of one core, over the time the work stood still: a long batch, not a hang
STILL_CAP = 10  # × loop_timeout_s: still this long is a hang whatever the CPU does


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
    still_cpu_s: float | None = None  # CPU seconds llama-server used meanwhile (None: unknown)


@dataclass(frozen=True)
class Work:
    """The loop's work as one answer shows it: is any slot processing, and how much has been done."""

    busy: bool
    done: float  # /slots: prompt tokens processed + tokens generated over the slots; /metrics: its counters


@dataclass(frozen=True)
class Pace:
    """The work at the last answer, and since when it has stood still (busy) or the time of that answer, with
    the child's CPU seconds then (None: unknown)."""

    work: Work
    since: float
    cpu: float | None = None

    def still_s(self, now: float) -> float:
        return now - self.since if self.work.busy else 0.0

    def still_cpu_s(self, cpu: float | None) -> float | None:
        """CPU seconds the child used since the work stood still."""
        return None if cpu is None or self.cpu is None else cpu - self.cpu


def pace(prev: Pace | None, work: Work, now: float, cpu: float | None = None) -> Pace:
    """Idle, newly busy, or moving: a fresh start. Busy and unchanged since the last answer: the clock runs on."""
    if prev is not None and work.busy and prev.work.busy and work.done == prev.work.done:
        return prev
    return Pace(work, now, cpu)


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


def probe_due(idle_s: float, stalled_s: float, interval_s: float, stall_s: float) -> str | None:
    """Why a probe is due now, or None. `idle_s`: since the last byte from the child on any request;
    `stalled_s`: the longest a request in flight has gone without a byte. A flowing answer is proof enough
    while it flows; a request that produces nothing for `stall_s` (a long prompt, or a hung loop while other
    answers come from the HTTP threads) is told apart by the probe: a working loop's work moves."""
    if idle_s >= interval_s:
        return f"no progress for {idle_s:.1f}s"
    if stalled_s >= stall_s:
        return f"a request has had no byte for {stalled_s:.1f}s"
    return None


def judge(a: Answers, limit_s: float) -> Outcome:
    """`limit_s`: loop_timeout_s, also the longest the work may stand still while a slot is processing."""
    health_ok = a.health == 200
    if a.asked_loop and a.loop is not None and a.loop not in NOT_A_LOOP_ANSWER:
        if a.still_s < limit_s or a.streamed:
            return Outcome.ALIVE  # even an error answer came back through the loop's queue
        computing = a.still_cpu_s is not None and a.still_cpu_s >= BUSY_CPU_SHARE * a.still_s
        if computing and a.still_s < STILL_CAP * limit_s:
            return Outcome.EXCUSED  # a batch longer than the timeout, but it computes
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
