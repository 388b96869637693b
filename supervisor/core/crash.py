"""Crash classification: exit status + the child's last log lines → one cause, in one table."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Cause(StrEnum):
    OOM_LOAD = "oom_load"  # device memory ran out while loading (exit 1 with allocation failures)
    OOM_COMPUTE = "oom_compute"  # device memory ran out while computing (abort)
    OOM_HOST = "oom_host"  # the kernel OOM killer (confirmed by the cgroup) or a failed host allocation
    MODEL_ERROR = "model_error"  # bad or mismatched model / projector
    PORT_IN_USE = "port_in_use"
    BAD_ARGS = "bad_args"
    SPAWN_FAILED = "spawn_failed"  # the binary could not be started at all
    CRASHED = "crashed"  # any other signal (SIGSEGV, SIGABRT without OOM lines...)
    UNRESPONSIVE = "unresponsive"  # load stalled, warmup failed, /health probes failed, or a fatal log line; we killed it
    WEDGED = "wedged"  # /health said ok but the inference loop did not answer its probe; we killed it
    EXITED = "exited"  # exited by itself, code 0 or an error we cannot place
    STOPPED = "stopped"  # we asked it to stop (shutdown, restart, reload)
    INTERNAL = "internal_error"  # the supervisor itself failed while running the child (retried)


OOM_CAUSES = frozenset({Cause.OOM_LOAD, Cause.OOM_COMPUTE})
# Causes where retrying the same command line cannot help.
NON_RETRYABLE = frozenset({Cause.BAD_ARGS, Cause.MODEL_ERROR, Cause.SPAWN_FAILED})

# Lines that mean the accelerator ran out of memory, whatever the backend (CUDA, Metal, Vulkan, CPU buffers).
_ALLOC_FAILURE = re.compile(
    r"cudaMalloc failed: out of memory|failed to allocate \S+ buffer|unable to allocate \S+ buffer"
    r"|failed to allocate buffer for kv cache|failed to allocate compute (?:pp )?buffers"
    r"|failed to allocate Metal buffer|ErrorOutOfDeviceMemory|ggml_aligned_malloc: insufficient memory"
    r"|CUDA error: out of memory|kIOGPUCommandBufferCallbackErrorOutOfMemory|Insufficient Memory"
    r"|std::bad_alloc|out of memory",
    re.IGNORECASE,
)
_ALLOC_SIZE = re.compile(r"allocating ([0-9.]+) MiB on device (\d+)")
# The device named where the size is not: "failed to allocate CUDA1 buffer", "unable to allocate CUDA1 buffer".
_ALLOC_DEVICE = re.compile(r"allocate CUDA(\d+) buffer|current device: (\d+)")
_HOST_ALLOC = re.compile(r"std::bad_alloc|ggml_aligned_malloc: insufficient memory|unable to allocate CPU buffer")
_PORT = re.compile(r"couldn't bind HTTP server socket|address already in use", re.IGNORECASE)
_BAD_ARG = re.compile(r"error: invalid argument: (\S+)|error: unknown argument: (\S+)|error while handling argument")
_MODEL = re.compile(
    r"failed to load model|error loading model|mismatch between text model|failed to load multimodal model"
    r"|failed to open GGUF|invalid magic|gguf_init_from_file"
)
# Lines after which the process may live on but can no longer answer: restart it.
FATAL_WHILE_RUNNING = re.compile(
    r"backend is in error state|CUDA error: (?!out of memory)|kIOGPUCommandBufferCallbackError(?!OutOfMemory)"
)


@dataclass(frozen=True)
class Exit:
    """How a child ended, and what it said last."""

    returncode: int | None  # negative: killed by that signal (asyncio convention)
    log_tail: tuple[str, ...] = ()
    signalled_by_us: bool = False
    cgroup_oom_kill: bool | None = None  # the cgroup's oom_kill count went up; None: not readable
    killed_as: Cause | None = None  # why the supervisor signalled it (a hung child), when it was not a plain stop


@dataclass(frozen=True)
class Verdict:
    cause: Cause
    detail: str
    alloc_mib: float | None = None  # the failed device allocation, when the log names it
    alloc_device: int | None = None  # the CUDA device it failed on ("CUDA<n>"), when the log names it


def signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _first(pattern: re.Pattern[str], lines: Iterable[str]) -> str | None:
    return next((ln for ln in lines if pattern.search(ln)), None)


def classify(ex: Exit) -> Verdict:
    lines = ex.log_tail
    rc = ex.returncode
    sig = signal_name(rc)
    alloc_line = _first(_ALLOC_FAILURE, lines)
    alloc_mib: float | None = None
    alloc_device: int | None = None
    for ln in lines:
        m = _ALLOC_SIZE.search(ln)
        if m and "fail" in ln:
            alloc_mib, alloc_device = float(m.group(1)), int(m.group(2))
        elif alloc_device is None and (d := _ALLOC_DEVICE.search(ln)):
            alloc_device = int(d.group(1) or d.group(2))

    if ex.signalled_by_us and alloc_line is None and ex.killed_as is not None:
        return Verdict(ex.killed_as, f"killed by the supervisor ({sig or f'exit {rc}'}): {ex.killed_as.value}")
    if ex.signalled_by_us and alloc_line is None:
        return Verdict(Cause.STOPPED, f"stopped by the supervisor ({sig or f'exit {rc}'})")
    if rc == -signal.SIGKILL and not ex.signalled_by_us:
        if ex.cgroup_oom_kill:
            return Verdict(Cause.OOM_HOST, "killed by SIGKILL (kernel OOM killer, confirmed by the cgroup)")
        if ex.cgroup_oom_kill is False:
            return Verdict(Cause.CRASHED, "killed by SIGKILL from outside (not the OOM killer: the cgroup's "
                                          "oom_kill count did not change)")
        # No readable counter (no memory controller for this cgroup): a SIGKILL alone does not say who sent it.
        return Verdict(Cause.CRASHED, "killed by SIGKILL from outside, sender unknown (the kernel OOM killer or "
                                      "another process: the cgroup's oom_kill count cannot be read here)")
    if ex.cgroup_oom_kill:
        return Verdict(Cause.OOM_HOST, f"cgroup OOM kill ({sig or f'exit {rc}'})")
    # Evidence in the log beats the exit code: cleanup after a failed load can itself abort.
    if alloc_line is not None and not _HOST_ALLOC.search(alloc_line):
        loading = _first(_MODEL, lines) is not None or any("failed to create context" in ln for ln in lines)
        cause = Cause.OOM_LOAD if (rc is not None and rc > 0) or loading else Cause.OOM_COMPUTE
        return Verdict(cause, alloc_line.strip(), alloc_mib, alloc_device)
    if alloc_line is not None:
        return Verdict(Cause.OOM_HOST, alloc_line.strip())
    if (line := _first(_PORT, lines)) is not None:
        return Verdict(Cause.PORT_IN_USE, line.strip())
    if (line := _first(_BAD_ARG, lines)) is not None:
        return Verdict(Cause.BAD_ARGS, line.strip())
    if (line := _first(_MODEL, lines)) is not None:
        # The most specific line wins: a projector mismatch says more than "failed to load model".
        specific = _first(re.compile(r"mismatch between|invalid magic|failed to open"), lines)
        return Verdict(Cause.MODEL_ERROR, (specific or line).strip())
    if sig is not None:
        return Verdict(Cause.CRASHED, f"killed by {sig}" + (f": {lines[-1].strip()}" if lines else ""))
    last = lines[-1].strip() if lines else "no output"
    return Verdict(Cause.EXITED, f"exited with code {rc}: {last}")
