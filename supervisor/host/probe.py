"""Ask the installed llama-server what it accepts (--help, --version, --list-devices): blocking subprocess calls."""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.capabilities import Capabilities, parse_devices, parse_help, parse_listing
from ..core.command import GPU_ORDER_ENV

_VERSION = re.compile(r"version: (\S+) \(build (\d+), commit (\w+)\)")


class CapabilityError(Exception):
    pass


def _run(binary: str, arg: str) -> str:
    try:
        # The children's CUDA device order (core/command.py), so that the devices listed are numbered as theirs are.
        cp = subprocess.run([binary, arg], capture_output=True, text=True, timeout=30, check=False,
                            env={**os.environ, **GPU_ORDER_ENV})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CapabilityError(f"cannot run {binary} {arg}: {exc}") from exc
    return cp.stdout + cp.stderr


_cache: dict[tuple[str, int, int], Capabilities] = {}


def probe(binary: str) -> Capabilities:
    """Blocking; cached per (path, mtime, size) so a rebuilt binary is probed again."""
    st = Path(binary).stat()
    key = (str(binary), st.st_mtime_ns, st.st_size)
    if key in _cache:
        return _cache[key]
    # The three at once: every start waits for them before its child is spawned, and --list-devices initialises
    # the GPU backends (the slowest of the three on a GPU box). A build without --list-devices fails that one
    # alone, and its answer is then not used.
    with ThreadPoolExecutor(3) as pool:
        help_f, version_f, listed_f = (pool.submit(_run, binary, arg) for arg in ("--help", "--version",
                                                                                  "--list-devices"))
        help_text = help_f.result()
        flags, value_flags, ngl_auto = parse_help(help_text)
        if "--model" not in flags:
            raise CapabilityError(f"{binary} does not look like llama-server: its --help lists no --model flag")
        m = _VERSION.search(version_f.result())
        listed = listed_f.result() if "--list-devices" in flags else ""
    version = f"{m.group(1)} (build {m.group(2)}, commit {m.group(3)})" if m else "unknown"
    caps = Capabilities(str(binary), version, frozenset(flags), frozenset(value_flags), ngl_auto,
                        tuple(parse_devices(listed)), tuple(parse_listing(listed)))
    _cache[key] = caps
    return caps

