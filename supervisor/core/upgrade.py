"""Which llama-server build a model runs, and when a build is a candidate for the canary. Pure: no I/O.

The box runs its last good build. A build that appears at the profile's path (an edit of `binary:`, a package
upgrade replacing the file, a symlink switched) and differs from the one seen there last time is a candidate:
the last good build keeps serving while the candidate is tried (core/canary.py), and only a pass switches.
A candidate that failed is not tried again until the path leads to yet another build. An operator's
`llama-supervisor upgrade --binary PATH` makes PATH's build the last good one without changing the profile:
the profile's own build, unchanged since it was last seen, is then no candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Run(Enum):
    PROFILE = "profile"  # the build the profile's path leads to
    LAST_GOOD = "last_good"  # the last good build (its own path, or the copy kept of it)


@dataclass(frozen=True)
class Facts:
    current: str  # checksum of the build the profile's path leads to now
    seen: str | None  # the one it led to when the last decision was taken (None: never)
    last_good: str | None  # the last good build's checksum (None: none yet)
    last_good_runnable: bool  # it can still be started (its file unchanged, or the copy kept of it)
    rejected: bool  # `current` failed a canary before


@dataclass(frozen=True)
class Plan:
    run: Run
    canary: bool  # try `current` as a candidate beside what runs
    adopt: bool  # no last good build yet: `current` becomes it once it is ready
    note: str = ""  # for the log, /status and the timeline when it is worth saying


def plan(f: Facts) -> Plan:
    if f.last_good is None:
        return Plan(Run.PROFILE, canary=False, adopt=True)
    if f.current == f.last_good:
        return Plan(Run.PROFILE, canary=False, adopt=False)
    if not f.last_good_runnable:
        # The build that worked is gone (file replaced, no copy kept): the profile's build is all there is.
        return Plan(Run.PROFILE, canary=False, adopt=True,
                    note="the last good build can no longer be started: running the profile's build without a canary")
    if f.rejected:
        return Plan(Run.LAST_GOOD, canary=False, adopt=False,
                    note="the profile's build failed its canary before: staying on the last good build")
    if f.current == f.seen:
        # Unchanged since the last decision, and not the last good one: an operator upgraded through the API.
        return Plan(Run.LAST_GOOD, canary=False, adopt=False)
    return Plan(Run.LAST_GOOD, canary=True, adopt=False, note="a new build at the profile's path: canary")


def in_probation(switched_at: float | None, now: float, probation_s: float) -> bool:
    """A build switched to `switched_at` (monotonic) that dies now is rolled back like a failed canary."""
    return switched_at is not None and now - switched_at <= probation_s
