"""The pure lifecycle machine: a table of transitions, and a property test over random event sequences."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.crash import Cause, Verdict
from supervisor.core.ladder import Evidence, RunSettings
from supervisor.core.lifecycle import (
    BackoffElapsed,
    ChildExited,
    ChildGone,
    Climb,
    Finished,
    Healthy,
    Kill,
    Machine,
    Policy,
    Remember,
    RestartRequested,
    Retry,
    SetTimer,
    Spawn,
    StableElapsed,
    Start,
    State,
    StopRequested,
    Unresponsive,
    WarmedUp,
    Warmup,
    backoff_delay,
    initial,
    transition,
)

P = Policy(backoff_base_s=1.0, backoff_cap_s=8.0, stable_s=60, breaker_failures=3, breaker_window_s=100,
           min_ctx=512, has_mmproj=True)
BASE = RunSettings(n_gpu_layers=8, ctx_size=2048)
CRASH = Verdict(Cause.CRASHED, "killed by SIGSEGV")
OOM = Verdict(Cause.OOM_LOAD, "cudaMalloc failed: out of memory", alloc_mib=800.0)


def at(state: State, **kw: object) -> Machine:
    kw.setdefault("child_alive", state in (State.STARTING, State.WARMING, State.READY, State.STOPPING))
    return replace(initial(BASE), state=state, gen=1, **kw)  # type: ignore[arg-type]


def exited(v: Verdict = CRASH, gen: int = 1, now: float = 10.0, rc: int | None = 1) -> ChildExited:
    return ChildExited(now, gen, v, rc, Evidence(model_layers=8), jitter=1.0)


class Exit:
    """Both events of a child's end, as the runner sends them: ChildGone, then the classified ChildExited."""

    def __init__(self, v: Verdict = CRASH, gen: int = 1, now: float = 10.0) -> None:
        self.events = (ChildGone(now, gen), exited(v, gen, now))


def apply(m: Machine, event: object) -> tuple[Machine, list[object]]:
    """One event, or an Exit's two; the actions of all of them."""
    acts: list[object] = []
    for ev in event.events if isinstance(event, Exit) else (event,):
        m, a = transition(m, ev, P)  # type: ignore[arg-type]
        acts += a
    return m, acts


@pytest.mark.parametrize(
    ("machine", "event", "state", "actions"),
    [
        (initial(BASE), Start(0), State.STARTING, [Spawn(1, BASE)]),
        (at(State.STARTING), Healthy(1, 1), State.WARMING, [Warmup(1)]),
        (at(State.STARTING), Healthy(1, 0), State.STARTING, []),  # stale generation
        (at(State.WARMING), WarmedUp(1, 1), State.READY, [Remember(BASE), SetTimer("stable", 1, 60)]),
        (at(State.READY), Exit(), State.BACKOFF, [SetTimer("backoff", 1, 1.0)]),
        (at(State.STARTING), Exit(), State.BACKOFF, [SetTimer("backoff", 1, 1.0)]),
        # The instant the child is gone it is no longer ready; nothing is decided until it is classified.
        (at(State.READY), ChildGone(10, 1), State.BACKOFF, []),
        (at(State.WARMING), ChildGone(10, 1), State.BACKOFF, []),
        (at(State.READY), ChildGone(10, 0), State.READY, []),  # stale generation
        (at(State.BACKOFF, child_alive=False, exiting=1), BackoffElapsed(5, 1), State.BACKOFF, []),
        (at(State.BACKOFF, child_alive=False, exiting=1), exited(), State.BACKOFF, [SetTimer("backoff", 1, 1.0)]),
        (at(State.BACKOFF, child_alive=False), exited(), State.BACKOFF, []),  # no exit awaited: ignored
        (at(State.STOPPING, pending=Cause.STOPPED), ChildGone(10, 1), State.STOPPED, [Finished()]),
        (at(State.BACKOFF, child_alive=False, exiting=1), StopRequested(11), State.STOPPED, [Finished()]),
        (at(State.STOPPED, child_alive=False, exiting=1), exited(), State.STOPPED, []),  # recorded only
        (at(State.BACKOFF, child_alive=False, exiting=1), RestartRequested(11, "op"), State.STARTING, [Spawn(2, BASE)]),
        (at(State.BACKOFF, child_alive=False), BackoffElapsed(5, 1), State.STARTING, [Spawn(2, BASE)]),
        (at(State.BACKOFF, child_alive=False), BackoffElapsed(5, 0), State.BACKOFF, []),
        (at(State.READY), Unresponsive(1, 1, "liveness"), State.BACKOFF, [Kill(1, "liveness")]),
        (at(State.STARTING), Unresponsive(1, 1, "load: stalled"), State.BACKOFF, [Kill(1, "load: stalled")]),
        (at(State.READY), StopRequested(1), State.STOPPING, [Kill(1, "shutdown")]),
        (at(State.READY), StopRequested(1, "unload (lru)"), State.STOPPING, [Kill(1, "unload (lru)")]),
        (at(State.STOPPING, pending=Cause.STOPPED), Exit(Verdict(Cause.STOPPED, "")), State.STOPPED, [Finished()]),
        (at(State.BACKOFF, child_alive=False), StopRequested(1), State.STOPPED, [Finished()]),
        (at(State.FAILED, child_alive=False), StopRequested(1), State.STOPPED, [Finished()]),
        (at(State.FAILED, child_alive=False), RestartRequested(1, "operator"), State.STARTING, [Spawn(2, BASE)]),
        (at(State.FAILED, child_alive=False), Start(1), State.STARTING, [Spawn(2, BASE)]),
        (at(State.READY), RestartRequested(1, "operator"), State.STARTING, [Kill(1, "operator")]),
        (at(State.READY), Start(1), State.READY, []),
        (at(State.STOPPING), RestartRequested(1, "operator"), State.STOPPING, []),
        (at(State.STOPPED, child_alive=False), RestartRequested(1, "late SIGHUP"), State.STOPPED, []),
        (at(State.READY), Exit(Verdict(Cause.BAD_ARGS, "error: invalid argument: --metal")), State.FAILED, []),
        (at(State.STARTING), Exit(Verdict(Cause.MODEL_ERROR, "mismatch between text model")), State.FAILED, []),
        (at(State.STARTING), Exit(Verdict(Cause.SPAWN_FAILED, "no such file")), State.FAILED, []),
        (at(State.STARTING), Exit(Verdict(Cause.INTERNAL, "ValueError")), State.BACKOFF, [SetTimer("backoff", 1, 1.0)]),
        (at(State.READY), StableElapsed(1, 1), State.READY, []),
        # A failed start is tried again when a file it depends on changes; nothing else is.
        (at(State.FAILED, child_alive=False), Retry(1, "model changed"), State.STARTING, [Spawn(2, BASE)]),
        (at(State.READY), Retry(1, "model changed"), State.READY, []),
        (at(State.BACKOFF, child_alive=False), Retry(1, "model changed"), State.BACKOFF, []),
        (at(State.READY), Climb(1, 1, RunSettings(16, 2048), "climb"), State.STARTING, [Kill(1, "climb")]),
        (at(State.READY), Climb(1, 0, RunSettings(16, 2048), "climb"), State.READY, []),  # stale generation
        (at(State.STARTING), Climb(1, 1, RunSettings(16, 2048), "climb"), State.STARTING, []),
    ],
)
def test_transition_table(machine: Machine, event: object, state: State, actions: list[object]) -> None:
    m, acts = apply(machine, event)
    assert m.state is state
    assert acts == actions


def test_restart_of_a_live_child_spawns_after_exit() -> None:
    m, _ = transition(at(State.READY), RestartRequested(1, "operator"), P)
    assert m.restart_after_exit and m.state is State.STARTING
    m, acts = transition(m, Healthy(2, 1), P)  # the old child's late health answer is ignored
    assert acts == [] and m.state is State.STARTING
    m, acts = apply(m, Exit(Verdict(Cause.STOPPED, "")))
    assert acts == [Spawn(2, BASE)] and m.restarts == 1 and m.failures == ()
    assert m.last_exit is not None and m.last_exit.cause is Cause.STOPPED  # the old child's exit is still recorded


def test_oom_walks_the_ladder_without_counting_failures() -> None:
    m = at(State.STARTING)
    m, acts = apply(m, Exit(OOM))
    assert m.state is State.BACKOFF and m.failures == () and m.effective.n_gpu_layers == 4
    assert "gpu_layers" in (m.adjustment or "")
    m, acts = transition(m, BackoffElapsed(11, 1), P)
    assert acts == [Spawn(2, RunSettings(4, 2048))]


def test_oom_after_idle_models_were_unloaded_retries_the_same_settings() -> None:
    """Several models: the pool unloaded idle others after this OOM, so the layers stay for one more try;
    the OOM after that (nothing more to free) walks the ladder."""
    m, _ = transition(at(State.STARTING), ChildGone(10.0, 1), P)
    freed = ChildExited(10.0, 1, OOM, 1, Evidence(model_layers=8, others_freed=True), jitter=1.0)
    m, acts = transition(m, freed, P)
    assert m.state is State.BACKOFF and m.effective == BASE and m.failures == () and m.adjustment is None
    assert "idle models were unloaded" in m.reason
    m, acts = transition(m, BackoffElapsed(11, 1), P)
    assert acts == [Spawn(2, BASE)]
    m, _ = apply(m, Exit(OOM, gen=2, now=12.0))
    assert m.effective.n_gpu_layers == 4


@pytest.mark.parametrize(("event", "cause"), [
    (Unresponsive(1, 1, "liveness: 3 failed probes"), Cause.UNRESPONSIVE),
    (Unresponsive(1, 1, "inference loop hung: /slots not answered", Cause.WEDGED), Cause.WEDGED),
])
def test_a_hung_child_we_killed_keeps_its_own_cause(event: Unresponsive, cause: Cause) -> None:
    m, _ = transition(at(State.READY), event, P)
    assert m.pending is cause and m.history[-1].cause == cause.value  # the timeline says it at the kill
    # The driver's examination says so too (it was signalled for this cause); a plain stop verdict would as well.
    for verdict in (Verdict(cause, "killed by the supervisor (SIGKILL)"), Verdict(Cause.STOPPED, "stopped")):
        done, _ = apply(m, Exit(verdict))
        assert done.last_exit is not None and done.last_exit.cause is cause
        assert done.last_exit.detail == event.detail
        assert done.state is State.BACKOFF and len(done.failures) == 1


def crash_n(m: Machine, n: int, t0: float = 10.0, served: float = 0.0) -> Machine:
    """n crashes in a row, each child ready for `served` seconds before it died."""
    for i in range(n):
        t = t0 + i * (served + 1)
        if m.state is State.BACKOFF:
            m, _ = transition(m, BackoffElapsed(t, m.gen), P)
        m, _ = transition(m, Healthy(t, m.gen), P)
        m, _ = transition(m, WarmedUp(t, m.gen), P)
        m, _ = apply(m, Exit(gen=m.gen, now=t + served))
    return m


def test_crash_loop_is_never_terminal() -> None:
    m = crash_n(at(State.STARTING), 2)
    assert m.state is State.BACKOFF and not m.crash_loop
    m = crash_n(m, 1, t0=20)
    # The third quick failure in the window: a crash loop, with its own reason and a long backoff, not failed.
    assert m.state is State.BACKOFF and m.crash_loop and m.reason.startswith("crash loop: 3 failures")
    assert m.history[-1].cause == "crash_loop"
    assert m.retry_at == pytest.approx(20 + P.backoff_cap_s, abs=0.01)  # jitter 1.0: the nominal delay
    m, acts = transition(m, BackoffElapsed(50, m.gen), P)
    assert m.state is State.STARTING and acts == [Spawn(m.gen, BASE)]
    m = crash_n(m, 6, t0=60)
    assert m.state is State.BACKOFF and m.crash_loop
    assert m.retry_at is not None and m.retry_at - m.history[-1].at == P.crash_loop_cap_s  # doubling, capped


def test_crash_after_serving_a_while_starts_a_new_count() -> None:
    """Killed every 15 s while serving (issue 11, seen 1): never a crash loop."""
    m = crash_n(at(State.STARTING), 10, served=15.0)
    assert m.state is State.BACKOFF and not m.crash_loop and len(m.failures) == 1 and m.attempt == 1


def test_crash_loop_ends_when_a_child_stays_up() -> None:
    m = crash_n(at(State.STARTING), 4)
    assert m.crash_loop
    m, _ = transition(m, BackoffElapsed(100, m.gen), P)
    m, _ = transition(m, Healthy(101, m.gen), P)
    m, _ = transition(m, WarmedUp(101, m.gen), P)
    m, _ = transition(m, StableElapsed(161, m.gen), P)
    assert not m.crash_loop and m.failures == () and m.attempt == 0


def test_failures_outside_the_window_do_not_count() -> None:
    m = at(State.STARTING, failures=(1.0, 2.0))
    m, _ = apply(m, Exit(now=500.0))
    assert m.state is State.BACKOFF and m.failures == (500.0,)


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff_delay(a, 1.0, P) for a in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 8, 8]
    assert backoff_delay(3, 0.0, P) == 2.0  # equal jitter: never below half
    # In a crash loop: from backoff_cap_s at the breaker_failures-th failure, doubling up to crash_loop_cap_s.
    assert [backoff_delay(a, 1.0, P, loop=True) for a in (3, 4, 5, 8, 20)] == [8, 16, 32, 256, 300]


def test_exit_during_classification_of_a_restart_is_recorded_only() -> None:
    m, _ = transition(at(State.READY), RestartRequested(1, "operator"), P)
    m, _ = transition(m, ChildGone(2, 1), P)
    assert m.state is State.STARTING and m.gen == 2 and m.exiting == 1
    m, acts = transition(m, exited(Verdict(Cause.STOPPED, "stopped"), gen=1, now=3), P)
    assert acts == [] and m.state is State.STARTING and m.exiting is None and m.child_alive


def test_climb_that_runs_out_of_memory_goes_back_and_is_remembered() -> None:
    low = RunSettings(4, 2048)
    m = at(State.READY, effective=low, adjustment="gpu_layers: ...")
    m, acts = transition(m, Climb(1, 1, BASE, "climb: more fits"), P)
    assert acts == [Kill(1, "climb: more fits")] and m.effective == BASE and m.climb_from == low
    m, acts = apply(m, Exit(Verdict(Cause.STOPPED, "stopped"), now=2))
    assert acts == [Spawn(2, BASE)]
    m, acts = apply(m, Exit(OOM, gen=2, now=3))
    assert m.state is State.BACKOFF and m.effective == low and m.climb_failed == (BASE, 3)
    assert "climb" in (m.adjustment or "") and m.failures == ()
    m, acts = transition(m, BackoffElapsed(4, 2), P)
    assert acts == [Spawn(3, low)]


def test_climb_that_reaches_ready_is_kept() -> None:
    m = at(State.READY, effective=RunSettings(4, 2048))
    m, _ = transition(m, Climb(1, 1, BASE, "climb"), P)
    m, _ = apply(m, Exit(Verdict(Cause.STOPPED, "stopped"), now=2))
    m, _ = transition(m, Healthy(3, 2), P)
    m, acts = transition(m, WarmedUp(3, 2), P)
    assert m.state is State.READY and m.climb_from is None and m.adjustment is None and Remember(BASE) in acts


def test_stable_period_resets_attempts() -> None:
    m, _ = transition(at(State.READY, attempt=3, failures=(1.0,), crash_loop=True), StableElapsed(70, 1), P)
    assert m.attempt == 0 and m.failures == () and not m.crash_loop


def test_reset_goes_back_to_profile_settings() -> None:
    m = at(State.BACKOFF, child_alive=False, effective=RunSettings(2, 1024), adjustment="x")
    m, acts = transition(m, RestartRequested(1, "operator", reset=True), P)
    assert acts == [Spawn(2, BASE)] and m.adjustment is None


def test_new_profile_replaces_base() -> None:
    new = RunSettings("auto", 8192)
    m, acts = transition(at(State.READY), RestartRequested(1, "profile changed", base=new), P)
    assert m.base == new and m.effective == new and acts == [Kill(1, "profile changed")]


def test_learned_settings_start_first() -> None:
    learned = RunSettings(3, 2048)
    _, acts = transition(initial(BASE, learned), Start(0), P)
    assert acts == [Spawn(1, learned)]


# ---- property: no event sequence raises or reaches an impossible state ---------------------------

verdicts = st.sampled_from([CRASH, OOM, Verdict(Cause.OOM_COMPUTE, "CUDA error: out of memory"),
                            Verdict(Cause.MODEL_ERROR, "bad"), Verdict(Cause.STOPPED, ""),
                            Verdict(Cause.OOM_HOST, "SIGKILL"), Verdict(Cause.EXITED, "0")])
gens = st.integers(min_value=0, max_value=6)
times = st.floats(min_value=0, max_value=1e4, allow_nan=False)
events = st.one_of(
    st.builds(Start, times), st.builds(Healthy, times, gens), st.builds(WarmedUp, times, gens),
    st.builds(Unresponsive, times, gens, st.just("x")),
    st.builds(ChildGone, times, gens),
    st.builds(ChildExited, times, gens, verdicts, st.just(1), st.just(Evidence(model_layers=4)),
              st.floats(0, 0.999)),
    st.builds(Retry, times, st.just("file")),
    st.builds(Climb, times, gens, st.just(RunSettings(6, 2048)), st.just("climb")),
    st.builds(BackoffElapsed, times, gens), st.builds(StableElapsed, times, gens),
    st.builds(RestartRequested, times, st.just("op"), st.none() | st.just(RunSettings("all", 4096)), st.booleans()),
    st.builds(StopRequested, times),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(events, max_size=40))
def test_no_sequence_reaches_an_impossible_state(seq: list[object]) -> None:
    m = initial(BASE)
    for ev in seq:
        m, actions = transition(m, ev, P)  # type: ignore[arg-type]
        assert isinstance(m.state, State)
        if m.state is State.STOPPED:
            assert not m.child_alive
        if m.state in (State.WARMING, State.READY):
            assert m.child_alive and m.pending is None
        if m.state is State.FAILED:
            assert not m.child_alive or m.pending is not None
        if m.child_alive:
            assert m.exiting != m.gen  # a live child's exit is never awaited
        if m.state is State.BACKOFF and not m.child_alive and m.exiting is None:
            assert m.retry_at is not None  # waiting for a timer that was set, never for nothing
        spawns = [a for a in actions if isinstance(a, Spawn)]
        assert len(spawns) <= 1
        if spawns:
            assert spawns[0].gen == m.gen and m.child_alive
        assert len(m.history) <= 20
        assert m.effective.ctx_size >= min(P.min_ctx, BASE.ctx_size)
        for a in actions:
            if isinstance(a, SetTimer):
                assert 0 < a.delay_s <= max(P.crash_loop_cap_s, P.stable_s)
