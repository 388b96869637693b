"""What a llama-server binary accepts, parsed from its own --help and --list-devices text. Pure: no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ALIAS = re.compile(r"(?:^|,\s*)(-{1,2}[A-Za-z0-9][\w.-]*)")
_DEVICE = re.compile(r"^\s+([A-Za-z]+\d+): ", re.M)
# "  CUDA0: NVIDIA H200 (143156 MiB, 142531 MiB free)" (common_print_available_devices in llama.cpp's common/arg.cpp)
_LISTED = re.compile(r"^\s+([A-Za-z]+\d+): (.*?) \((\d+) MiB, (\d+) MiB free\)\s*$", re.M)
# The help's first column (the flags) is padded to this width; longer specs sit alone on their line.
_SPEC_WIDTH = 40


@dataclass(frozen=True)
class Listed:
    """One device as `--list-devices` shows it."""

    name: str  # llama-server's name for it, what --device takes: "CUDA0"
    description: str  # the driver's name of the card: "NVIDIA H200"
    total_mib: float


@dataclass(frozen=True)
class Capabilities:
    binary: str
    version: str
    flags: frozenset[str]  # every spelling, e.g. "-c" and "--ctx-size"
    value_flags: frozenset[str]  # flags that take a value
    ngl_auto: bool  # -ngl accepts "auto"/"all" (newer builds)
    devices: tuple[str, ...] = ()  # from --list-devices: "CUDA0", "MTL0", "Vulkan0"... (empty: CPU only)
    listing: tuple[Listed, ...] = ()  # the same devices with their descriptions and memory

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def has_metal(self) -> bool:
        return any(d.startswith("MTL") for d in self.devices)


def parse_help(text: str) -> tuple[set[str], set[str], bool]:
    flags: set[str] = set()
    value_flags: set[str] = set()
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
    return flags, value_flags, ngl_auto


def parse_devices(text: str) -> list[str]:
    """Device names from `--list-devices` ("  CUDA0: NVIDIA H100 ...", "  MTL0: Apple M2 ...")."""
    return _DEVICE.findall(text)


def parse_listing(text: str) -> list[Listed]:
    """`--list-devices` with each device's description and total memory (what names a CUDA device's card)."""
    return [Listed(m.group(1), m.group(2).strip(), float(m.group(3))) for m in _LISTED.finditer(text)]
