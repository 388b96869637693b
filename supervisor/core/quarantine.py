"""Poison requests: a request that was in flight at two crashes is refused for a while. Pure: no I/O, no clock.

llama.cpp has had many crash-on-input bugs (an image or a prompt that hits an assert). One crash with a
request in flight proves nothing (many requests are in flight at any crash), so a request is quarantined
only when the same one (a hash of method, path and body) was in flight at two crashes within a window.
Only crashes that look like an input bug count: the child aborted or faulted by itself (SIGABRT, SIGSEGV,
SIGBUS, SIGFPE, SIGILL, SIGTRAP), or its inference loop hung and the supervisor killed it (`wedged`). A
SIGKILL from outside, the OOM killer, a stop by the supervisor or an out-of-memory abort (the ladder's
business) never do. Only hashes are kept, in memory; never bodies.
"""

from __future__ import annotations

import hashlib
import signal
from dataclasses import dataclass, field, replace

# Signals with which a process ends itself on a bug (assert → abort, bad pointer → SIGSEGV, ...).
INPUT_BUG_SIGNALS = frozenset({signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                               signal.SIGTRAP})
MAX_CRASHES = 16  # remembered crashes (each with its suspects), oldest dropped first
MAX_BLOCKED = 256


@dataclass(frozen=True)
class Policy:
    window_s: float = 600.0  # two crashes within this window ...
    duration_s: float = 3600.0  # ... quarantine the request for this long


@dataclass(frozen=True)
class Crash:
    at: float
    suspects: frozenset[str]


@dataclass(frozen=True)
class Blocked:
    until: float
    since: float
    crashes: tuple[float, ...]  # when the crashes that convicted it happened
    what: str  # method, path, size: for the log and /status (never the body)


@dataclass(frozen=True)
class Quarantine:
    crashes: tuple[Crash, ...] = ()
    blocked: dict[str, Blocked] = field(default_factory=dict)


def request_hash(method: str, path: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        h.update(len(part).to_bytes(8, "little"))  # lengths first: ("a", "bc") and ("ab", "c") differ
        h.update(part)
    return h.hexdigest()[:32]


def counts(cause: str, returncode: int | None) -> bool:
    """Does this exit look like llama-server hit a bug on its input? A wedged inference loop counts too (the
    supervisor killed it): a sampler or grammar that never ends on some input hangs the loop for everyone."""
    if cause == "wedged":
        return True
    if cause != "crashed" or returncode is None or returncode >= 0:
        return False
    try:
        return signal.Signals(-returncode) in INPUT_BUG_SIGNALS
    except ValueError:
        return False


def on_crash(q: Quarantine, now: float, suspects: dict[str, str], p: Policy) -> tuple[Quarantine, list[str]]:
    """Record a crash with the requests in flight (hash → description); returns the hashes newly quarantined."""
    q = prune(q, now, p)
    newly = []
    blocked = dict(q.blocked)
    for h, what in suspects.items():
        earlier = [c.at for c in q.crashes if h in c.suspects]
        if earlier and h not in blocked:
            blocked[h] = Blocked(until=now + p.duration_s, since=now, crashes=(earlier[-1], now), what=what)
            newly.append(h)
    if len(blocked) > MAX_BLOCKED:  # bounded memory: the oldest convictions go first
        blocked = dict(sorted(blocked.items(), key=lambda kv: kv[1].since)[-MAX_BLOCKED:])
    crashes = (q.crashes + (Crash(now, frozenset(suspects)),))[-MAX_CRASHES:]
    return replace(q, crashes=crashes, blocked=blocked), newly


def prune(q: Quarantine, now: float, p: Policy) -> Quarantine:
    crashes = tuple(c for c in q.crashes if now - c.at < p.window_s)
    blocked = {h: b for h, b in q.blocked.items() if b.until > now}
    if len(crashes) == len(q.crashes) and len(blocked) == len(q.blocked):
        return q
    return Quarantine(crashes, blocked)


def lookup(q: Quarantine, h: str, now: float) -> Blocked | None:
    b = q.blocked.get(h)
    return b if b is not None and b.until > now else None
