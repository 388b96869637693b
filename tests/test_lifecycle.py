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
    Finished,
    Healthy,
    Kill,
    Machine,
    Policy,
    Remember,
    RestartRequested,
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


def exited(v: Verdict = CRASH, gen: int = 1, now: float = 10.0) -> ChildExited:
    return ChildExited(now, gen, v, 1, Evidence(model_layers=8), jitter=1.0)


@pytest.mark.parametrize(
    ("machine", "event", "state", "actions"),
    [
        (initial(BASE), Start(0), State.STARTING, [Spawn(1, BASE)]),
        (at(State.STARTING), Healthy(1, 1), State.WARMING, [Warmup(1)]),
        (at(State.STARTING), Healthy(1, 0), State.STARTING, []),  # stale generation
        (at(State.WARMING), WarmedUp(1, 1), State.READY, [Remember(BASE), SetTimer("stable", 1, 60)]),
        (at(State.READY), exited(), State.BACKOFF, [SetTimer("backoff", 1, 1.0)]),
        (at(State.STARTING), exited(), State.BACKOFF, [SetTimer("backoff", 1, 1.0)]),
        (at(State.BACKOFF, child_alive=False), BackoffElapsed(5, 1), State.STARTING, [Spawn(2, BASE)]),
        (at(State.BACKOFF, child_alive=False), BackoffElapsed(5, 0), State.BACKOFF, []),
        (at(State.READY), Unresponsive(1, 1, "liveness"), State.BACKOFF, [Kill(1, "liveness")]),
        (at(State.STARTING), Unresponsive(1, 1, "load: stalled"), State.BACKOFF, [Kill(1, "load: stalled")]),
        (at(State.READY), StopRequested(1), State.STOPPING, [Kill(1, "shutdown")]),
        (at(State.STOPPING, pending=Cause.STOPPED), exited(Verdict(Cause.STOPPED, "")), State.STOPPED, [Finished()]),
        (at(State.BACKOFF, child_alive=False), StopRequested(1), State.STOPPED, [Finished()]),
        (at(State.FAILED, child_alive=False), StopRequested(1), State.STOPPED, [Finished()]),
        (at(State.FAILED, child_alive=False), RestartRequested(1, "operator"), State.STARTING, [Spawn(2, BASE)]),
        (at(State.FAILED, child_alive=False), Start(1), State.STARTING, [Spawn(2, BASE)]),
        (at(State.READY), RestartRequested(1, "operator"), State.STARTING, [Kill(1, "operator")]),
        (at(State.READY), Start(1), State.READY, []),
        (at(State.STOPPING), RestartRequested(1, "operator"), State.STOPPING, []),
        (at(State.READY), exited(Verdict(Cause.BAD_ARGS, "error: invalid argument: --metal")), State.FAILED, []),
        (at(State.STARTING), exited(Verdict(Cause.MODEL_ERROR, "mismatch between text model")), State.FAILED, []),
        (at(State.STARTING), exited(Verdict(Cause.SPAWN_FAILED, "no such file")), State.FAILED, []),
        (at(State.READY), StableElapsed(1, 1), State.READY, []),
    ],
)
def test_transition_table(machine: Machine, event: object, state: State, actions: list[object]) -> None:
    m, acts = transition(machine, event, P)  # type: ignore[arg-type]
    assert m.state is state
    assert acts == actions


def test_restart_of_a_live_child_spawns_after_exit() -> None:
    m, _ = transition(at(State.READY), RestartRequested(1, "operator"), P)
    assert m.restart_after_exit and m.state is State.STARTING
    m, acts = transition(m, Healthy(2, 1), P)  # the old child's late health answer is ignored
    assert acts == [] and m.state is State.STARTING
    m, acts = transition(m, exited(Verdict(Cause.STOPPED, "")), P)
    assert acts == [Spawn(2, BASE)] and m.restarts == 1 and m.failures == ()


def test_oom_walks_the_ladder_without_counting_failures() -> None:
    m = at(State.STARTING)
    m, acts = transition(m, exited(OOM), P)
    assert m.state is State.BACKOFF and m.failures == () and m.effective.n_gpu_layers == 4
    assert "gpu_layers" in (m.adjustment or "")
    m, acts = transition(m, BackoffElapsed(11, 1), P)
    assert acts == [Spawn(2, RunSettings(4, 2048))]


def test_wedged_kill_is_classified_wedged() -> None:
    m, _ = transition(at(State.READY), Unresponsive(1, 1, "liveness: 3 failed probes"), P)
    m, acts = transition(m, exited(Verdict(Cause.STOPPED, "stopped by the supervisor")), P)
    assert m.last_exit is not None and m.last_exit.cause is Cause.WEDGED
    assert m.last_exit.detail == "liveness: 3 failed probes"
    assert m.state is State.BACKOFF and len(m.failures) == 1


def test_breaker_trips_after_n_failures_in_window() -> None:
    m = at(State.STARTING)
    for i in range(2):
        m, _ = transition(m, exited(gen=m.gen, now=10.0 + i), P)
        assert m.state is State.BACKOFF
        m, _ = transition(m, BackoffElapsed(10.5 + i, m.gen), P)
    m, acts = transition(m, exited(gen=m.gen, now=12.0), P)
    assert m.state is State.FAILED and acts == [] and "crash loop: 3 failures" in m.reason


def test_failures_outside_the_window_do_not_count() -> None:
    m = at(State.STARTING, failures=(1.0, 2.0))
    m, _ = transition(m, exited(now=500.0), P)
    assert m.state is State.BACKOFF and m.failures == (500.0,)


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff_delay(a, 1.0, P) for a in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 8, 8]
    assert backoff_delay(3, 0.0, P) == 2.0  # equal jitter: never below half


def test_stable_period_resets_attempts() -> None:
    m, _ = transition(at(State.READY, attempt=3), StableElapsed(70, 1), P)
    assert m.attempt == 0


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
    m, acts = transition(initial(BASE, learned), Start(0), P)
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
    st.builds(ChildExited, times, gens, verdicts, st.just(1), st.just(Evidence(model_layers=4)),
              st.floats(0, 0.999)),
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
        spawns = [a for a in actions if isinstance(a, Spawn)]
        assert len(spawns) <= 1
        if spawns:
            assert spawns[0].gen == m.gen and m.child_alive
        assert len(m.history) <= 20
        assert m.effective.ctx_size >= min(P.min_ctx, BASE.ctx_size)
        for a in actions:
            if isinstance(a, SetTimer):
                assert 0 < a.delay_s <= max(P.backoff_cap_s, P.stable_s)
