"""Leaving a load balancer's pool: one owner for "why is this box going away", read by /health and the agent.

Set by the daemon on SIGTERM and by the reloader around a profile change that restarts the child; while
it is set, /health answers 503 and the agent check says `drain`, so the balancer stops sending new work
here while the requests in flight finish (docs/fleet.md).
"""

from __future__ import annotations


class Drain:
    def __init__(self) -> None:
        self.reason: str | None = None

    def begin(self, reason: str) -> bool:
        """Start draining; False when a drain (e.g. a shutdown) is already on, which keeps its reason."""
        if self.reason is not None:
            return False
        self.reason = reason
        return True

    def end(self, reason: str) -> None:
        """End the drain this reason began (a shutdown that came meanwhile stays)."""
        if self.reason == reason:
            self.reason = None
