"""sd_notify, written directly: one datagram per message to $NOTIFY_SOCKET. A no-op outside systemd."""

from __future__ import annotations

import os
import socket

from ..core.lifecycle import State

# How often the keepalive speaks when systemd set no watchdog, and how long each start extension lasts
# compared with that period (one lost or late message is not yet a timeout).
KEEPALIVE_PERIOD_S = 10.0
EXTEND_PERIODS = 3
# The first start is still going on in these states: loading, warming up, or waiting for the next try.
FIRST_START_STATES = frozenset({State.STARTING, State.WARMING, State.BACKOFF})


def extends_start(state: State, ready_sent: bool) -> bool:
    """Whether to send EXTEND_TIMEOUT_USEC now.

    Only before the first READY=1: systemd applies an extension to whatever timeout runs in the unit's current
    state, and while the unit is active that is the watchdog's. Sent once the unit is active (e.g. when
    llama-server restarts) it would blind the watchdog for the whole extension. Not in `failed` either: there
    the start timeout is allowed to run out, and Restart= takes over.
    """
    return not ready_sent and state in FIRST_START_STATES


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # systemd writes abstract socket names with a leading '@'; the kernel wants a NUL byte there.
        self.address: str | None = ("\0" + addr[1:]) if addr.startswith("@") else (addr or None)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self.ready_sent = False  # READY=1 went out: the unit is active, start extensions are over
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def keepalive_period_s(self) -> float:
        """A watchdog ping every third of WatchdogSec; start extensions ride along (or go alone at 10 s)."""
        return self.watchdog_s / 3 if self.watchdog_s else KEEPALIVE_PERIOD_S

    def keepalive_fields(self, state: State) -> list[str]:
        fields = ["WATCHDOG=1"] if self.watchdog_s else []
        if extends_start(state, self.ready_sent):
            fields.append(f"EXTEND_TIMEOUT_USEC={round(self.keepalive_period_s * EXTEND_PERIODS * 1e6)}")
        return fields

    def send(self, *fields: str) -> bool:
        """Send KEY=VALUE lines. Non-blocking: a datagram either goes or is dropped."""
        if "READY=1" in fields:
            self.ready_sent = True
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
