"""The child process: spawn in its own process group, drain its pipes, stop it, never leave it behind."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from ..telemetry import logs
from .output import PipeLines

log = structlog.get_logger("child")
PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 200


def _resolve_prctl() -> Callable[..., int] | None:
    """Looked up once, in the parent: a dlopen between fork and exec of a multi-threaded process can deadlock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # best effort: the process group is still stopped with the supervisor


_PRCTL = _resolve_prctl()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel kills it if the supervisor dies (Linux). Only the
    call itself happens here; the symbol was resolved before the fork."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Child:
    """One running llama-server. `on_lines` sees every line it prints, a read's worth at a time (to spot fatal
    messages, and for the ops page's log). `coalesce_s` > 0 reads its pipes at most that often (output.py)."""

    def __init__(self, proc: asyncio.subprocess.Process, on_lines: Callable[[list[str]], None] | None = None,
                 echo: bool = True) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.time()
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.last_output = time.monotonic()
        self.signalled = False
        self.printed = asyncio.Event()  # set on every read of log lines and when a pipe closes: readiness looks
        self.coalesce_s = 0.0  # the driver sets COALESCE_S once the child serves (its start reads every line at once)
        self._exited = False
        self._on_lines = on_lines
        self._echo = echo
        self._pipes: list[PipeLines] = []

    async def _read(self, fd: int, name: str) -> None:
        loop = asyncio.get_running_loop()
        pipe = PipeLines(lambda raws: self._lines(name, raws), lambda: 0.0 if self._exited else self.coalesce_s)
        self._pipes.append(pipe)
        await loop.connect_read_pipe(lambda: pipe, os.fdopen(fd, "rb", buffering=0))

    def _lines(self, name: str, raws: list[bytes]) -> None:
        lines = [line for raw in raws if (line := raw.decode("utf-8", "replace").rstrip())]
        if not lines:
            return
        self.tail.extend(lines)
        self.last_output = time.monotonic()
        self.printed.set()
        if self._echo:
            logs.child_lines(name, self.pid, lines)
        if self._on_lines is not None:
            self._on_lines(lines)

    async def wait(self) -> int:
        """Wait for exit and for both pipes to be drained, so the log tail is complete."""
        rc = await self.proc.wait()
        self._exited = True
        for pipe in self._pipes:
            pipe.resume()  # its last lines now, not after a pause
        await asyncio.gather(*(pipe.done for pipe in self._pipes), return_exceptions=True)
        self.printed.set()
        return rc

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.proc.send_signal(sig)

    def kill_now(self) -> None:
        """SIGKILL the process group at once (no waiting): for when the supervisor cannot wait."""
        self.signalled = True
        self._signal_group(signal.SIGKILL)

    async def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM the process group, SIGKILL it after `timeout_s`. Returns the exit code."""
        if self.proc.returncode is None:
            self.signalled = True
            self._signal_group(signal.SIGTERM)
            # A stopped (SIGSTOP) child cannot act on SIGTERM until it runs again.
            self._signal_group(signal.SIGCONT)
            try:
                return await asyncio.wait_for(self.wait(), timeout_s)
            except TimeoutError:
                log.warning("child_kill", pid=self.pid, reason=f"still running {timeout_s}s after SIGTERM")
                self._signal_group(signal.SIGKILL)
        # Also sweep the group: helpers the child forked must not outlive it.
        self._signal_group(signal.SIGKILL)
        return await self.wait()


def oom_kill_count() -> int | None:
    """The cgroup's oom_kill counter, to tell the kernel OOM killer from other SIGKILLs (v2, or v1's oom_control)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.oom_control")
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for entry in text.splitlines():
            key, _, value = entry.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


async def spawn(argv: Sequence[str], env: dict[str, str], on_lines: Callable[[list[str]], None] | None = None,
                echo: bool = True) -> Child:
    """Start argv (never through a shell) in a new session. Raises OSError when it cannot start."""
    # Our own pipes, read by our own protocols (output.py), so reading can pause between bursts of lines.
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)  # the child has its copies: the pipes end when it does
        os.close(err_w)
    child = Child(proc, on_lines, echo)
    await child._read(out_r, "stdout")
    await child._read(err_r, "stderr")
    return child
