"""What the installed llama-server really accepts, read from the binary itself (--help, --version)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_ALIAS = re.compile(r"(?:^|,\s*)(-{1,2}[A-Za-z0-9][\w.-]*)")
_ENV = re.compile(r"\(env: (LLAMA_[A-Z0-9_]+)\)")
_VERSION = re.compile(r"version: (\S+) \(build (\d+), commit (\w+)\)")
_DEVICE = re.compile(r"^\s+([A-Za-z]+\d+): ", re.M)
# The help's first column (the flags) is padded to this width; longer specs sit alone on their line.
_SPEC_WIDTH = 40


class CapabilityError(Exception):
    pass


@dataclass(frozen=True)
class Capabilities:
    binary: str
    version: str
    flags: frozenset[str]  # every spelling, e.g. "-c" and "--ctx-size"
    value_flags: frozenset[str]  # flags that take a value
    env_vars: frozenset[str]
    ngl_auto: bool  # -ngl accepts "auto"/"all" (newer builds)
    devices: tuple[str, ...] = ()  # from --list-devices: "CUDA0", "MTL0", "Vulkan0"... (empty: CPU only)

    def has(self, flag: str) -> bool:
        return flag in self.flags


def parse_help(text: str) -> tuple[set[str], set[str], set[str], bool]:
    flags: set[str] = set()
    value_flags: set[str] = set()
    envs = set(_ENV.findall(text))
    ngl_auto = False
    current: set[str] = set()
    for line in text.splitlines():
        if line.startswith("-"):
            fits = len(line) > _SPEC_WIDTH and line[_SPEC_WIDTH - 1] == " " and line[_SPEC_WIDTH] != " "
            spec = (line[:_SPEC_WIDTH] if fits else line).strip()
            aliases = _ALIAS.findall(spec)
            last = spec.rfind(aliases[-1]) + len(aliases[-1]) if aliases else 0
            takes_value = bool(spec[last:].strip())
            current = set(aliases)
            flags |= current
            if takes_value:
                value_flags |= current
            line = line[_SPEC_WIDTH:] if fits else ""
        if "--n-gpu-layers" in current and "'auto'" in line:
            ngl_auto = True
    return flags, value_flags, envs, ngl_auto


def parse_devices(text: str) -> list[str]:
    """Device names from `--list-devices` ("  CUDA0: NVIDIA H100 ...", "  MTL0: Apple M2 ...")."""
    return _DEVICE.findall(text)


def _run(binary: str, arg: str) -> str:
    try:
        cp = subprocess.run([binary, arg], capture_output=True, text=True, timeout=30, check=False)
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
    help_text = _run(binary, "--help")
    flags, value_flags, envs, ngl_auto = parse_help(help_text)
    if "--model" not in flags:
        raise CapabilityError(f"{binary} does not look like llama-server: its --help lists no --model flag")
    m = _VERSION.search(_run(binary, "--version"))
    version = f"{m.group(1)} (build {m.group(2)}, commit {m.group(3)})" if m else "unknown"
    devices = tuple(parse_devices(_run(binary, "--list-devices"))) if "--list-devices" in flags else ()
    caps = Capabilities(str(binary), version, frozenset(flags), frozenset(value_flags), frozenset(envs), ngl_auto,
                        devices)
    _cache[key] = caps
    return caps

