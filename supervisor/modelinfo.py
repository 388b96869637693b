"""Facts about a GGUF model from its header, read with a few struct calls (no numpy, no weights).

Keeping numpy out of the daemon keeps its idle footprint small; the full reader (gguf package) is only
used for the VRAM estimate, on machines with a GPU.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# GGUF value types → struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _read(fh: BinaryIO, fmt: str) -> object:
    size = struct.calcsize("<" + fmt)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack("<" + fmt, data)[0]


def _count(fh: BinaryIO, fmt: str) -> int:
    value = _read(fh, fmt)
    assert isinstance(value, int)
    return value


def _string(fh: BinaryIO) -> str:
    n = _count(fh, "Q")
    return fh.read(n).decode("utf-8", "replace")


def _value(fh: BinaryIO, vtype: int, keep: bool) -> object:
    if vtype in _SCALARS:
        return _read(fh, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(fh)
    if vtype == _ARRAY:
        itype, n = _count(fh, "I"), _count(fh, "Q")
        if itype in _SCALARS and not keep:
            fh.seek(n * struct.calcsize("<" + _SCALARS[itype]), 1)  # skip without reading
            return None
        items = [_value(fh, itype, keep) for _ in range(n)]
        return items if keep else None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_kv(path: Path, keys: set[str]) -> dict[str, object]:
    """The metadata values named in `keys` ('{arch}' is replaced by general.architecture). Blocking."""
    out: dict[str, object] = {}
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        _read(fh, "I")  # version
        _read(fh, "Q")  # tensor count
        n_kv = _count(fh, "Q")
        raw: dict[str, object] = {}
        for _ in range(n_kv):
            key = _string(fh)
            vtype = _count(fh, "I")
            wanted = key == "general.architecture" or any(key.endswith(k.split("}")[-1]) for k in keys)
            raw[key] = _value(fh, vtype, keep=wanted)
    arch = raw.get("general.architecture")
    out["general.architecture"] = arch
    for k in keys:
        real = k.replace("{arch}", str(arch))
        if real in raw:
            out[k] = raw[real]
    return out


def block_count(path: Path) -> int | None:
    """The model's layer count, or None when the file does not say (or cannot be read)."""
    try:
        value = read_kv(path, {"{arch}.block_count"}).get("{arch}.block_count")
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None
    return int(value) if isinstance(value, int) else None
