"""The lifecycle state machine: transition(machine, event, policy) → (machine, actions). Pure: no I/O, no clock.

The runner owns the one Machine, feeds it events (with the time they happened) and carries out the
actions it returns. Every child gets a generation number; events about an older child are ignored,
so late timers and probes of a dead child cannot move the machine.

A child's end is two events: `ChildGone` the instant its wait() returns (the machine leaves `ready` at
once, so nothing is sent to a closed port while the exit is examined), then `ChildExited` with the
classification and the out-of-memory evidence, which decides what comes next (backoff, a ladder step,
a crash-loop backoff, or `failed` for causes that retrying cannot fix).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from .crash import NON_RETRYABLE, OOM_CAUSES, Cause, Verdict
from .ladder import Evidence, RunSettings, next_rung

HISTORY_LEN = 20
HUNG = frozenset({Cause.UNRESPONSIVE, Cause.WEDGED})  # the supervisor killed a child that had stopped working


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Policy:
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    stable_s: float = 60.0  # ready this long → the backoff resets
    breaker_failures: int = 5  # this many counted failures ...
    breaker_window_s: float = 300.0  # ... within this window → crash loop (longer backoff, never terminal)
    crash_loop_cap_s: float = 300.0  # the crash-loop backoff grows up to this
    healthy_uptime_s: float = 10.0  # a child that served this long before it died: its death starts a new count
    min_ctx: int = 2048
    has_mmproj: bool = False


# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    now: float


@dataclass(frozen=True)
class Healthy:
    now: float
    gen: int


@dataclass(frozen=True)
class WarmedUp:
    now: float
    gen: int


@dataclass(frozen=True)
class Unresponsive:
    """The child must go: load timed out, warmup failed, /health probes failed or a fatal log line
    (`unresponsive`), or its inference loop stopped answering while /health still said ok (`wedged`)."""

    now: float
    gen: int
    detail: str
    cause: Cause = Cause.UNRESPONSIVE


@dataclass(frozen=True)
class ChildGone:
    """The child's wait() returned: it is gone, whatever the cause (classification follows)."""

    now: float
    gen: int


@dataclass(frozen=True)
class ChildExited:
    """The classified exit of child `gen` (after ChildGone), with the evidence the ladder needs."""

    now: float
    gen: int
    verdict: Verdict
    returncode: int | None = None
    evidence: Evidence = field(default_factory=Evidence)
    jitter: float = 0.5  # uniform [0, 1), drawn by the runner so this module stays deterministic


@dataclass(frozen=True)
class BackoffElapsed:
    now: float
    gen: int


@dataclass(frozen=True)
class StableElapsed:
    now: float
    gen: int


@dataclass(frozen=True)
class RestartRequested:
    now: float
    reason: str
    base: RunSettings | None = None  # new profile settings (reload); None keeps the current ones
    reset: bool = False  # drop ladder adjustments and go back to the profile's values


@dataclass(frozen=True)
class StopRequested:
    now: float
    reason: str = "shutdown"  # or why the pool unloads the model (lru, ttl, admin, reload...)


@dataclass(frozen=True)
class Retry:
    """A file the failed start depended on changed (model, projector, binary, profile): try again."""

    now: float
    reason: str


@dataclass(frozen=True)
class Climb:
    """More fits now than the reduced settings child `gen` runs with: restart it with `settings`."""

    now: float
    gen: int
    settings: RunSettings
    reason: str


Event = (Start | Healthy | WarmedUp | Unresponsive | ChildGone | ChildExited | BackoffElapsed | StableElapsed
         | RestartRequested | StopRequested | Retry | Climb)

# ---- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    gen: int
    settings: RunSettings


@dataclass(frozen=True)
class Kill:
    gen: int
    reason: str


@dataclass(frozen=True)
class Warmup:
    gen: int


@dataclass(frozen=True)
class SetTimer:
    kind: str  # "backoff" | "stable"
    gen: int
    delay_s: float


@dataclass(frozen=True)
class Remember:
    """These settings reached ready: persist them for the next start."""

    settings: RunSettings


@dataclass(frozen=True)
class Finished:
    """Stopping is complete."""


Action = Spawn | Kill | Warmup | SetTimer | Remember | Finished

# ---- machine ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    at: float
    src: State
    dst: State
    cause: str
    detail: str


@dataclass(frozen=True)
class LastExit:
    at: float
    returncode: int | None
    cause: Cause
    detail: str


@dataclass(frozen=True)
class Machine:
    base: RunSettings  # what the profile asks for
    effective: RunSettings  # what the current (or next) child runs with
    state: State = State.STOPPED
    since: float = 0.0
    gen: int = 0
    child_alive: bool = False
    pending: Cause | None = None  # why we are killing the current child
    kill_reason: str = ""  # ... in words
    restart_after_exit: bool = False
    exiting: int | None = None  # the generation whose exit awaits its classification (ChildExited)
    ready_at: float | None = None  # when the current child reached ready
    served_s: float = 0.0  # how long the last child that went had been ready
    attempt: int = 0  # consecutive counted failures, for the backoff
    failures: tuple[float, ...] = ()  # times of counted failures, for the crash-loop detection
    crash_loop: bool = False  # retrying at the crash-loop backoff until a child stays up for stable_s
    retry_at: float | None = None  # when the backoff timer fires
    restarts: int = 0
    reason: str = ""
    adjustment: str | None = None  # last ladder step or climb, in words
    climb_from: RunSettings | None = None  # the settings a climb left: an OOM of the climbed child goes back there
    climb_failed: tuple[RunSettings, float] | None = None  # the last climb that ran out of memory, and when
    last_exit: LastExit | None = None
    history: tuple[Transition, ...] = field(default=())


def initial(base: RunSettings, start: RunSettings | None = None, why: str | None = None,
            after: Machine | None = None) -> Machine:
    """A stopped machine; `start` (learned or estimated settings) replaces the profile's for the first start.
    `after`: the machine of the runner's previous child (a model loaded again): its generations, restart count,
    history and last exit go on, so nothing keyed by generation (quarantine, the timeline) sees one twice."""
    eff = start or base
    adj = (why or "resumed with the last settings that worked") if start and start != base else None
    if after is None:
        return Machine(base=base, effective=eff, adjustment=adj)
    return Machine(base=base, effective=eff, adjustment=adj, state=after.state, since=after.since, gen=after.gen,
                   restarts=after.restarts, last_exit=after.last_exit, history=after.history)


def backoff_delay(attempt: int, jitter: float, p: Policy, loop: bool = False) -> float:
    """Exponential, capped at backoff_cap_s; in a crash loop it goes on doubling from backoff_cap_s
    (at the breaker_failures-th failure) up to crash_loop_cap_s."""
    if loop:
        raw = min(p.crash_loop_cap_s, p.backoff_cap_s * (2 ** max(0, attempt - p.breaker_failures)))
    else:
        raw = min(p.backoff_cap_s, p.backoff_base_s * (2 ** max(0, attempt - 1)))
    return raw / 2 + raw / 2 * jitter  # "equal jitter": never below half the nominal delay


def _move(m: Machine, now: float, dst: State, cause: str, detail: str = "", *, record: bool = False,
          **changes: object) -> Machine:
    """Change state; `record` keeps a history entry even when the state stays the same (a decision made
    in backoff, after the classification of an exit)."""
    m = replace(m, **changes)  # type: ignore[arg-type]
    if dst is m.state and not record:
        return replace(m, reason=detail or m.reason)
    t = Transition(now, m.state, dst, cause, detail)
    return replace(m, state=dst, since=now if dst is not m.state else m.since, reason=detail,
                   history=(m.history + (t,))[-HISTORY_LEN:])


def _spawn(m: Machine, now: float, cause: str, detail: str = "", **changes: object) -> tuple[Machine, list[Action]]:
    m = _move(replace(m, **changes), now, State.STARTING, cause, detail)  # type: ignore[arg-type]
    m = replace(m, gen=m.gen + 1, child_alive=True, pending=None, kill_reason="", restart_after_exit=False,
                ready_at=None, retry_at=None)
    return m, [Spawn(m.gen, m.effective)]


def _kill(m: Machine, now: float, dst: State, pending: Cause, detail: str, restart: bool) -> tuple[Machine, list[Action]]:
    m = _move(m, now, dst, pending.value, detail, pending=pending, kill_reason=detail, restart_after_exit=restart)
    return m, [Kill(m.gen, detail)]


def transition(m: Machine, ev: Event, p: Policy) -> tuple[Machine, list[Action]]:
    s = m.state
    match ev:
        case Start(now=now) if s in (State.STOPPED, State.FAILED) and not m.child_alive:
            return _spawn(m, now, "start")
        case Healthy(now=now, gen=g) if s is State.STARTING and g == m.gen and m.child_alive and m.pending is None:
            return _move(m, now, State.WARMING, "healthy"), [Warmup(g)]
        case WarmedUp(now=now, gen=g) if s is State.WARMING and g == m.gen and m.child_alive and m.pending is None:
            m = _move(m, now, State.READY, "warmed_up", ready_at=now, climb_from=None)
            return m, [Remember(m.effective), SetTimer("stable", g, p.stable_s)]
        case StableElapsed(gen=g) if s is State.READY and g == m.gen:
            return replace(m, attempt=0, failures=(), crash_loop=False), []
        case Unresponsive(now=now, gen=g, detail=d, cause=why) if g == m.gen and m.child_alive and m.pending is None and (
            s in (State.STARTING, State.WARMING, State.READY)
        ):
            return _kill(m, now, State.BACKOFF, why, d, restart=False)
        case ChildGone(now=now, gen=g) if g == m.gen and m.child_alive:
            return _gone(m, now)
        case ChildExited(gen=g) if g == m.exiting:
            return _exited(m, ev, p)
        case BackoffElapsed(now=now, gen=g) if s is State.BACKOFF and g == m.gen and not m.child_alive and (
            m.exiting is None
        ):
            return _spawn(m, now, "backoff_elapsed", m.reason if m.crash_loop else "", restarts=m.restarts + 1)
        case RestartRequested(now=now, reason=why, base=base, reset=reset) if s not in (State.STOPPING, State.STOPPED):
            new_base = base or m.base
            eff = new_base if (reset or base is not None) else m.effective
            changes: dict[str, object] = {"base": new_base, "effective": eff, "attempt": 0, "failures": (),
                                          "crash_loop": False, "climb_from": None}
            if reset or base is not None:
                changes.update(adjustment=None, climb_failed=None)
            if m.child_alive:
                m = replace(m, **changes)  # type: ignore[arg-type]
                return _kill(m, now, State.STARTING, Cause.STOPPED, why, restart=True)
            return _spawn(m, now, "restart", why, restarts=m.restarts + 1, **changes)
        case Retry(now=now, reason=why) if s is State.FAILED and not m.child_alive:
            return _spawn(m, now, "retry", why, restarts=m.restarts + 1, attempt=0, failures=(), crash_loop=False)
        case Climb(now=now, gen=g, settings=new, reason=why) if (
            s is State.READY and g == m.gen and m.child_alive and m.pending is None and new != m.effective
        ):
            m = replace(m, effective=new, climb_from=m.effective, adjustment=None if new == m.base else why)
            return _kill(m, now, State.STARTING, Cause.STOPPED, why, restart=True)
        case StopRequested(now=now, reason=why) if s not in (State.STOPPING, State.STOPPED):
            if m.child_alive:
                return _kill(m, now, State.STOPPING, Cause.STOPPED, why, restart=False)
            return _move(m, now, State.STOPPED, "stop", pending=None, retry_at=None), [Finished()]
    return m, []


def _gone(m: Machine, now: float) -> tuple[Machine, list[Action]]:
    """The child is gone: leave ready (or finish stopping) at once; what comes next waits for ChildExited."""
    served = now - m.ready_at if m.ready_at is not None and m.state is State.READY else 0.0
    m = replace(m, child_alive=False, exiting=m.gen, ready_at=None, served_s=served)
    if m.state is State.STOPPING:
        return _move(m, now, State.STOPPED, "stopped", m.kill_reason or "shutdown", pending=None), [Finished()]
    if m.restart_after_exit:
        return _spawn(m, now, "restart", m.kill_reason, restarts=m.restarts + 1)
    detail = m.kill_reason or "llama-server exited; examining the exit"
    return _move(m, now, State.BACKOFF, "exited", detail), []


def _exited(m: Machine, ev: ChildExited, p: Policy) -> tuple[Machine, list[Action]]:
    now, v = ev.now, ev.verdict
    # Out-of-memory lines in the log beat our own reason for killing it (Metal lives on after an OOM).
    decide = m.state is State.BACKOFF and m.gen == ev.gen and not m.child_alive
    pending = m.pending if decide else None
    cause = v.cause if v.cause in OOM_CAUSES else (pending or v.cause)
    detail = m.kill_reason if cause in HUNG and pending is cause and m.kill_reason else v.detail
    m = replace(m, exiting=None, last_exit=LastExit(now, ev.returncode, cause, detail))
    if not decide:
        return m, []  # stopped, or a new child already runs: the exit is only recorded
    climb_from = m.climb_from
    m = replace(m, pending=None, kill_reason="", climb_from=None)
    if cause in NON_RETRYABLE:
        return _move(m, now, State.FAILED, cause.value, detail, crash_loop=False), []
    if cause in OOM_CAUSES and climb_from is not None:
        # A climb that did not fit: straight back to what ran before it, and no new climb for a while.
        why = f"climb to {m.effective.describe()} ran out of memory: back to {climb_from.describe()}"
        m = _move(m, now, State.BACKOFF, cause.value, f"{detail} → {why}", record=True, effective=climb_from,
                  adjustment=why, climb_failed=(m.effective, now))
        return _backoff(m, backoff_delay(1, ev.jitter, p), now)
    if cause in OOM_CAUSES and ev.evidence.others_freed:
        # Other models held the memory and were unloaded: the same settings first, the ladder only if that fails.
        why = "idle models were unloaded to free memory: the same settings again"
        m = _move(m, now, State.BACKOFF, cause.value, f"{detail} → {why}", record=True)
        return _backoff(m, backoff_delay(1, ev.jitter, p), now)
    if cause in OOM_CAUSES:
        rung = next_rung(m.effective, ev.evidence, min_ctx=p.min_ctx, has_mmproj=p.has_mmproj)
        if rung is not None:
            # A ladder step is progress, not a failure: it does not count toward the crash loop.
            m = _move(m, now, State.BACKOFF, cause.value, f"{detail} → {rung.reason}", record=True,
                      effective=rung.settings, adjustment=f"{rung.step}: {rung.reason} (after {cause.value})")
            return _backoff(m, backoff_delay(1, ev.jitter, p), now)
    if m.served_s >= p.healthy_uptime_s:
        # It served for a while: these settings work. A fresh count, and a short backoff.
        failures: tuple[float, ...] = (now,)
        attempt = 1
    else:
        failures = tuple(t for t in m.failures if now - t < p.breaker_window_s) + (now,)
        attempt = m.attempt + 1
    # attempt >= len(failures) always (both reset together), so a loop's backoff starts at backoff_cap_s.
    loop = (m.crash_loop and attempt > 1) or len(failures) >= p.breaker_failures
    delay = backoff_delay(attempt, ev.jitter, p, loop)
    if loop:
        why = (f"crash loop: {attempt} failures in a row, none serving {p.healthy_uptime_s:.0f}s; "
               f"next try in {delay:.0f}s; last: {cause.value}: {detail}")
        m = _move(m, now, State.BACKOFF, "crash_loop", why, record=True, failures=failures, attempt=attempt,
                  crash_loop=True)
    else:
        m = _move(m, now, State.BACKOFF, cause.value, detail, record=True, failures=failures, attempt=attempt,
                  crash_loop=False)
    return _backoff(m, delay, now)


def _backoff(m: Machine, delay: float, now: float) -> tuple[Machine, list[Action]]:
    m = replace(m, retry_at=now + delay)
    return m, [SetTimer("backoff", m.gen, delay)]
