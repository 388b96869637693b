"""The pure decisions of issue 11, as tables: climbing back (core/climb.py) and poison requests (core/quarantine.py)."""

from __future__ import annotations

import signal

import pytest

from supervisor.core import quarantine as q
from supervisor.core.climb import ClimbPolicy, Fit, decide, higher, is_reduced, target
from supervisor.core.ladder import RunSettings

N = 24  # model blocks; 25 offloadable layers with the output layer
ON = ClimbPolicy()


def fit(layers: int) -> Fit:
    return Fit(layers, N, f"{layers}/25 layers fit")


@pytest.mark.parametrize(
    ("base", "eff", "reduced"),
    [
        (RunSettings(99, 4096), RunSettings(99, 4096), False),
        (RunSettings(99, 4096), RunSettings(25, 4096), False),  # 99 asks for everything: 25 is everything
        (RunSettings(99, 4096), RunSettings(5, 4096), True),
        (RunSettings(99, 4096), RunSettings(25, 2048), True),  # context lowered
        (RunSettings(99, 4096), RunSettings(0, 4096, cpu_only=True), True),
        (RunSettings(99, 4096), RunSettings(25, 4096, mmproj_offload=False), True),
        (RunSettings("auto", 4096), RunSettings(7, 4096), True),  # the ladder made 'auto' explicit
        (RunSettings("all", 4096), RunSettings(25, 4096), False),
        (RunSettings(10, 4096), RunSettings(10, 4096), False),
    ],
)
def test_is_reduced(base: RunSettings, eff: RunSettings, reduced: bool) -> None:
    assert is_reduced(base, eff, N) is reduced


@pytest.mark.parametrize(
    ("base", "eff", "fits", "want"),
    [
        # Issue 11, seen 2: learned 5 layers, 17 fit now → 17.
        (RunSettings(99, 4096), RunSettings(5, 4096), 17, RunSettings(17, 4096)),
        (RunSettings(99, 4096), RunSettings(5, 4096), 25, RunSettings(99, 4096)),  # everything fits: the profile
        (RunSettings(99, 4096), RunSettings(5, 4096), 5, None),  # nothing to gain
        (RunSettings(99, 4096), RunSettings(5, 4096), 3, None),  # less fits than runs: never climb down here
        (RunSettings(99, 4096), RunSettings(12, 2048), 12, RunSettings(12, 4096)),  # the context comes back
        (RunSettings(99, 4096), RunSettings(12, 2048), 11, None),  # not without giving up a layer
        (RunSettings(99, 4096), RunSettings(0, 4096, cpu_only=True), 8, RunSettings(8, 4096)),
        (RunSettings("auto", 4096), RunSettings(7, 4096), 9, RunSettings("auto", 4096)),
        (RunSettings("auto", 4096), RunSettings(7, 4096), 7, None),
        (RunSettings(20, 4096), RunSettings(10, 4096), 22, RunSettings(20, 4096)),  # never above the profile
    ],
)
def test_target(base: RunSettings, eff: RunSettings, fits: int, want: RunSettings | None) -> None:
    assert target(base, eff, fit(fits)) == want


def test_decide_waits_after_a_failed_climb_and_can_be_off() -> None:
    base, low = RunSettings(99, 4096), RunSettings(5, 4096)
    got = decide(base, low, fit(17), now=100.0, policy=ON, failed=None)
    assert got is not None and got[0] == RunSettings(17, 4096) and "5 GPU layers" in got[1] and "17/25" in got[1]
    assert decide(base, low, fit(17), now=100.0, policy=ON, failed=(RunSettings(17, 4096), 50.0)) is None
    assert decide(base, low, fit(17), now=5000.0, policy=ON, failed=(RunSettings(17, 4096), 50.0)) is not None
    assert decide(base, low, fit(17), now=100.0, policy=ClimbPolicy(enabled=False), failed=None) is None
    assert decide(base, low, None, now=100.0, policy=ON, failed=None) is None  # no NVML: no climb
    assert decide(base, base, fit(25), now=100.0, policy=ON, failed=None) is None  # not reduced


def test_higher() -> None:
    assert higher(RunSettings(6, 4096), RunSettings(5, 4096), N)
    assert not higher(RunSettings(6, 2048), RunSettings(5, 4096), N)  # gives up context
    assert not higher(RunSettings(5, 4096), RunSettings(5, 4096), N)


# ---- quarantine -----------------------------------------------------------------------------------------------

P = q.Policy(window_s=600, duration_s=3600)
ABRT, SEGV, KILL = -int(signal.SIGABRT), -int(signal.SIGSEGV), -int(signal.SIGKILL)


@pytest.mark.parametrize(
    ("cause", "rc", "counts"),
    [("crashed", ABRT, True), ("crashed", SEGV, True), ("crashed", KILL, False), ("oom_host", KILL, False),
     ("oom_compute", ABRT, False), ("stopped", -15, False), ("exited", 1, False), ("crashed", None, False),
     ("wedged", KILL, True), ("unresponsive", KILL, False)],
)
def test_which_exits_count(cause: str, rc: int | None, counts: bool) -> None:
    assert q.counts(cause, rc) is counts


def test_one_crash_never_quarantines_two_within_the_window_do() -> None:
    s, new = q.on_crash(q.Quarantine(), 10.0, {"a": "POST /v1/chat/completions (10 bytes)", "b": "x"}, P)
    assert new == [] and q.lookup(s, "a", 11.0) is None
    s, new = q.on_crash(s, 100.0, {"a": "POST /v1/chat/completions (10 bytes)", "c": "y"}, P)
    assert new == ["a"]
    b = q.lookup(s, "a", 101.0)
    assert b is not None and b.crashes == (10.0, 100.0) and b.until == 3700.0
    assert q.lookup(s, "b", 101.0) is None and q.lookup(s, "c", 101.0) is None
    assert q.lookup(s, "a", 3701.0) is None  # for a while, not for ever


def test_crashes_outside_the_window_do_not_convict() -> None:
    s, _ = q.on_crash(q.Quarantine(), 10.0, {"a": ""}, P)
    s, new = q.on_crash(s, 700.0, {"a": ""}, P)
    assert new == []


def test_request_hash_covers_method_path_and_body() -> None:
    h = q.request_hash("POST", "/v1/chat/completions", b"{}")
    assert h == q.request_hash("POST", "/v1/chat/completions", b"{}")
    assert h != q.request_hash("POST", "/v1/completions", b"{}")
    assert h != q.request_hash("PUT", "/v1/chat/completions", b"{}")
    assert q.request_hash("POST", "/a", b"b/c") != q.request_hash("POST", "/ab", b"/c")
