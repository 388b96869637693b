"""The lifecycle state machine: transition(machine, event, policy) → (machine, actions). Pure: no I/O, no clock.

The runner owns the one Machine, feeds it events (with the time they happened) and carries out the
actions it returns. Every child gets a generation number; events about an older child are ignored,
so late timers and probes of a dead child cannot move the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from .crash import NON_RETRYABLE, OOM_CAUSES, Cause, Verdict
from .ladder import Evidence, RunSettings, next_rung

HISTORY_LEN = 20


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
    breaker_window_s: float = 300.0  # ... within this window → failed
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
    """Load timed out, warmup failed, liveness probes failed, or a fatal log line: the child must go."""

    now: float
    gen: int
    detail: str


@dataclass(frozen=True)
class ChildExited:
    now: float
    gen: int
    verdict: Verdict
    returncode: int | None = None
    evidence: Evidence = Evidence()
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


Event = Start | Healthy | WarmedUp | Unresponsive | ChildExited | BackoffElapsed | StableElapsed | RestartRequested | StopRequested

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
    restart_after_exit: bool = False
    attempt: int = 0  # consecutive counted failures, for the backoff
    failures: tuple[float, ...] = ()  # times of counted failures, for the breaker
    restarts: int = 0
    reason: str = ""
    adjustment: str | None = None  # last ladder step, in words
    last_exit: LastExit | None = None
    history: tuple[Transition, ...] = field(default=())


def initial(base: RunSettings, start: RunSettings | None = None, why: str | None = None) -> Machine:
    """A stopped machine; `start` (learned or estimated settings) replaces the profile's for the first start."""
    eff = start or base
    adj = (why or "resumed with the last settings that worked") if start and start != base else None
    return Machine(base=base, effective=eff, adjustment=adj)


def backoff_delay(attempt: int, jitter: float, p: Policy) -> float:
    raw = min(p.backoff_cap_s, p.backoff_base_s * (2 ** max(0, attempt - 1)))
    return raw / 2 + raw / 2 * jitter  # "equal jitter": never below half the nominal delay


def _move(m: Machine, now: float, dst: State, cause: str, detail: str = "", **changes: object) -> Machine:
    m = replace(m, **changes)  # type: ignore[arg-type]
    if dst is m.state:
        return replace(m, reason=detail or m.reason)
    t = Transition(now, m.state, dst, cause, detail)
    return replace(m, state=dst, since=now, reason=detail, history=(m.history + (t,))[-HISTORY_LEN:])


def _spawn(m: Machine, now: float, cause: str, detail: str = "", **changes: object) -> tuple[Machine, list[Action]]:
    m = _move(m, now, State.STARTING, cause, detail, **changes)
    m = replace(m, gen=m.gen + 1, child_alive=True, pending=None, restart_after_exit=False)
    return m, [Spawn(m.gen, m.effective)]


def _kill(m: Machine, now: float, dst: State, pending: Cause, detail: str, restart: bool) -> tuple[Machine, list[Action]]:
    m = _move(m, now, dst, pending.value, detail, pending=pending, restart_after_exit=restart)
    return m, [Kill(m.gen, detail)]


def transition(m: Machine, ev: Event, p: Policy) -> tuple[Machine, list[Action]]:
    s = m.state
    match ev:
        case Start(now=now) if s in (State.STOPPED, State.FAILED) and not m.child_alive:
            return _spawn(m, now, "start")
        case Healthy(now=now, gen=g) if s is State.STARTING and g == m.gen and m.pending is None:
            return _move(m, now, State.WARMING, "healthy"), [Warmup(g)]
        case WarmedUp(now=now, gen=g) if s is State.WARMING and g == m.gen and m.pending is None:
            m = _move(m, now, State.READY, "warmed_up")
            return m, [Remember(m.effective), SetTimer("stable", g, p.stable_s)]
        case StableElapsed(gen=g) if s is State.READY and g == m.gen:
            return replace(m, attempt=0), []
        case Unresponsive(now=now, gen=g, detail=d) if g == m.gen and m.child_alive and m.pending is None and s in (
            State.STARTING, State.WARMING, State.READY,
        ):
            return _kill(m, now, State.BACKOFF, Cause.WEDGED, d, restart=False)
        case ChildExited(gen=g) if g == m.gen and m.child_alive:
            return _exited(m, ev, p)
        case BackoffElapsed(now=now, gen=g) if s is State.BACKOFF and g == m.gen and not m.child_alive:
            return _spawn(m, now, "backoff_elapsed", restarts=m.restarts + 1)
        case RestartRequested(now=now, reason=why, base=base, reset=reset) if s is not State.STOPPING:
            new_base = base or m.base
            eff = new_base if (reset or base is not None) else m.effective
            changes: dict[str, object] = {"base": new_base, "effective": eff, "attempt": 0, "failures": ()}
            if reset or base is not None:
                changes["adjustment"] = None
            if m.child_alive:
                m = replace(m, **changes)  # type: ignore[arg-type]
                return _kill(m, now, State.STARTING, Cause.STOPPED, why, restart=True)
            return _spawn(m, now, "restart", why, restarts=m.restarts + 1, **changes)
        case StopRequested(now=now) if s is not State.STOPPING and s is not State.STOPPED:
            if m.child_alive:
                return _kill(m, now, State.STOPPING, Cause.STOPPED, "shutdown", restart=False)
            return _move(m, now, State.STOPPED, "stop"), [Finished()]
    return m, []


def _exited(m: Machine, ev: ChildExited, p: Policy) -> tuple[Machine, list[Action]]:
    now, v = ev.now, ev.verdict
    # Out-of-memory lines in the log beat our own reason for killing it (Metal lives on after an OOM).
    cause = v.cause if v.cause in OOM_CAUSES else (m.pending or v.cause)
    detail = m.reason if cause is Cause.WEDGED and m.pending is Cause.WEDGED else v.detail
    last = LastExit(now, ev.returncode, cause, detail)
    m = replace(m, child_alive=False, last_exit=last)
    if m.state is State.STOPPING:
        return _move(m, now, State.STOPPED, "stopped", "shutdown", pending=None), [Finished()]
    if m.restart_after_exit:
        return _spawn(m, now, "restart", m.reason, restarts=m.restarts + 1)
    if cause in NON_RETRYABLE:
        return _move(m, now, State.FAILED, cause.value, detail, pending=None), []
    if cause in OOM_CAUSES:
        rung = next_rung(m.effective, ev.evidence, min_ctx=p.min_ctx, has_mmproj=p.has_mmproj)
        if rung is not None:
            # A ladder step is progress, not a failure: it does not count toward the breaker.
            delay = backoff_delay(1, ev.jitter, p)
            m = _move(m, now, State.BACKOFF, cause.value, f"{detail} → {rung.reason}", pending=None,
                      effective=rung.settings, adjustment=f"{rung.step}: {rung.reason} (after {cause.value})")
            return m, [SetTimer("backoff", m.gen, delay)]
    failures = tuple(t for t in m.failures if now - t < p.breaker_window_s) + (now,)
    if len(failures) >= p.breaker_failures:
        why = f"crash loop: {len(failures)} failures within {p.breaker_window_s:.0f}s; last: {cause.value}: {detail}"
        return _move(m, now, State.FAILED, "crash_loop", why, failures=failures, pending=None), []
    attempt = m.attempt + 1
    delay = backoff_delay(attempt, ev.jitter, p)
    m = _move(m, now, State.BACKOFF, cause.value, detail, failures=failures, attempt=attempt, pending=None)
    return m, [SetTimer("backoff", m.gen, delay)]
