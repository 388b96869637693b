"""A real hang for tests: stop ONE thread of a running process, the way a driver call that never returns would.

llama-server runs its inference loop on the main thread (tid == pid) and answers /health from its HTTP threads;
stopping only the main thread leaves /health at 200 while nothing is generated. `ptrace(PTRACE_SEIZE)` +
`PTRACE_INTERRUPT` stop exactly one thread (a signal would stop them all). The tracer must stay alive while the
thread is held (the kernel lets a tracee go when its tracer exits), and ptrace calls must come from the thread
that attached, so the tracer is this file run as its own small process: `ThreadStop` starts it and talks to it
over a pipe. Needs root or CAP_SYS_PTRACE (Yama's ptrace_scope allows a privileged tracer).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import subprocess
import sys

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for a thread that is not a child of ours


def _hold(tid: int) -> None:
    """The tracer's side: stop `tid`, say so, keep it stopped until stdin says go (or closes), then let it run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    for request in (PTRACE_SEIZE, PTRACE_INTERRUPT):
        if libc.ptrace(request, tid, None, None) != 0:
            err = ctypes.get_errno()
            print(f"error ptrace({request:#x}, {tid}): {os.strerror(err)}", flush=True)
            sys.exit(1)
    _, status = os.waitpid(tid, WALL)
    if not os.WIFSTOPPED(status):
        print(f"error: thread {tid} did not stop (status {status:#x})", flush=True)
        sys.exit(1)
    print("stopped", flush=True)
    # Hold it until told (stdin says anything, or closes), reaping what the kernel reports meanwhile: a killed
    # tracee's exit goes to its tracer first, and its parent (the supervisor) sees it only once we have.
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        pid, status = os.waitpid(tid, WALL | os.WNOHANG)
        if pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            return  # gone (killed while held): nothing to let go
        # Anything else (a signal on its way to the held thread) leaves it stopped: the hang goes on.
    libc.ptrace(PTRACE_DETACH, tid, None, None)


class ThreadStop:
    """Holds thread `tid` stopped from a tracer process until `release()` (or the end of a `with` block)."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.proc = subprocess.Popen([sys.executable, __file__, str(tid)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        said = self.proc.stdout.readline().strip()
        if said != "stopped":
            self.release()
            raise RuntimeError(f"could not stop thread {tid}: {said or 'the tracer exited'}")

    def release(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ThreadStop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


if __name__ == "__main__":
    _hold(int(sys.argv[1]))
