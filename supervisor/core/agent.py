"""What the supervisor tells HAProxy's agent check: a pure function of state, drain, slots and load.

HAProxy's agent check (`agent-check` on a `server` line) connects to a small TCP port, reads one line
and closes. The words it understands: a weight as a percentage of the server's configured weight,
`ready` (cancel DRAIN/MAINT), `drain` (no new requests; those in flight go on), `maint` (no new
requests, health checks paused; agent checks go on), and a `#comment`. Only the agent can undo what the
agent set, so every answer for a serving box says `ready` again. (Checked against HAProxy 2.6: leaving
MAINT on `ready` puts the server UP at once; leaving DRAIN waits for the health check's `rise`.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .lifecycle import State

# A busy box keeps a small share: if every box were at 0 % HAProxy would have no server at all and
# answer 503, while llama-server would simply queue the request behind its busy slots.
MIN_WEIGHT_PCT = 1


@dataclass(frozen=True)
class Load:
    """What the box knows about its own capacity when HAProxy asks."""

    state: State | None  # None: the model the box's health depends on is not loaded (several models)
    draining: str | None = None  # why the box is leaving the pool (shutdown, profile change), or None
    total_slots: int | None = None  # llama-server's /props total_slots; None until known
    in_flight: int = 0  # requests the proxy is handling now (sent upstream or waiting for readiness)


def _comment(text: str) -> str:
    # The reply is one line of words separated by spaces, tabs or commas: keep the comment one word.
    cleaned = "".join(c if c.isalnum() or c in "-_.:/" else "_" for c in text.strip())[:60]
    return cleaned or "-"


def weight_pct(total_slots: int | None, in_flight: int) -> int:
    """Free slots as a share of all slots, in percent, never below MIN_WEIGHT_PCT."""
    if not total_slots or total_slots <= 0:
        return 100 if in_flight <= 0 else MIN_WEIGHT_PCT
    free = max(0, total_slots - max(0, in_flight))
    return max(MIN_WEIGHT_PCT, round(100 * free / total_slots))


def reply(load: Load) -> str:
    """The agent's answer, newline included."""
    s = load.state
    if s is None:
        # With several models, as /health: the default (or a pinned model) is unloaded, so the box is out.
        return "maint #unloaded\n" if load.draining is None else f"drain #{_comment(load.draining)}\n"
    if s in (State.STOPPING, State.STOPPED):
        return "drain #shutdown\n"
    if load.draining is not None:
        # Requests in flight finish; health checks keep running, so the box also shows DOWN once /health
        # answers 503, and comes back through the check's `rise` when a new process says `ready`.
        return f"drain #{_comment(load.draining)}\n"
    if s is State.READY:
        return f"ready {weight_pct(load.total_slots, load.in_flight)}%\n"
    # Restarting (STARTING, WARMING, BACKOFF) or FAILED: nothing to send there until it is READY again, and
    # `ready` from this agent brings it straight back without waiting for the health check's `rise`.
    return f"maint #{s.value}\n"
