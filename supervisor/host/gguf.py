"""The one GGUF reader: magic check, header metadata, tensor sizes → layer count and VRAM footprint.

It reads the header and the tensor table with a few struct calls (no numpy, no weights), so the
daemon's idle footprint stays small and a multi-gigabyte model costs a few kilobytes of reading.
Everything here is blocking file I/O: call it through asyncio.to_thread from async code.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..core.estimate import CACHE_BYTES, MIB, Footprint

MAGIC = b"GGUF"
# GGUF value types → struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor type → (elements per block, bytes per block), as llama.cpp's ggml.c lists them.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Tensor:
    name: str
    n_bytes: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # the keys asked for (all of them when none were named)
    tensors: tuple[Tensor, ...]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture") or "llama")

    def int_field(self, key: str, default: int | None = None) -> int:
        value = self.metadata.get(key.replace("{arch}", self.arch), default)
        if not isinstance(value, int):
            raise ValueError(f"GGUF field {key.replace('{arch}', self.arch)} missing or not an integer")
        return value


def check_gguf(path: Path) -> None:
    """Raises ValueError (for a profile field) unless `path` is a readable file that starts with GGUF's magic."""
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    if magic != MAGIC:
        raise ValueError(f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF'): {path}")


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
    data = fh.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data.decode("utf-8", "replace")


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


def read_header(path: Path, keys: set[str] | None = None, *, tensors: bool = False) -> Header:
    """Metadata (only `keys`, with '{arch}' standing for general.architecture, or all) and, if asked, the
    tensor table with each tensor's size in bytes."""
    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise ValueError(f"{path}: not a GGUF file")
        _read(fh, "I")  # version
        n_tensors = _count(fh, "Q")
        n_kv = _count(fh, "Q")
        suffixes = {k.split("}")[-1] for k in keys} if keys is not None else None
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = _string(fh)
            vtype = _count(fh, "I")
            wanted = suffixes is None or key == "general.architecture" or any(key.endswith(s) for s in suffixes)
            value = _value(fh, vtype, keep=wanted)
            if wanted:
                meta[key] = value
        table: list[Tensor] = []
        for _ in range(n_tensors if tensors else 0):
            name = _string(fh)
            dims = [_count(fh, "Q") for _ in range(_count(fh, "I"))]
            ttype = _count(fh, "I")
            _count(fh, "Q")  # offset
            per_block, block_bytes = GGML_BLOCKS.get(ttype, (1, 0))
            elements = 1
            for d in dims:
                elements *= d
            table.append(Tensor(name, elements // per_block * block_bytes))
    return Header(meta, tuple(table))


def block_count(path: Path) -> int | None:
    """The model's layer count, or None when the file does not say (or cannot be read)."""
    try:
        return read_header(path, {"{arch}.block_count"}).int_field("{arch}.block_count")
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None


def footprint(model: Path, ctx_size: int, cache_type_k: str | None = None, cache_type_v: str | None = None,
              mmproj: Path | None = None) -> Footprint:
    """Per-layer weights, the output head and the KV cache at `ctx_size`, from the header and tensor table."""
    keys = {"{arch}.block_count", "{arch}.embedding_length", "{arch}.attention.head_count",
            "{arch}.attention.head_count_kv", "{arch}.attention.key_length", "{arch}.attention.value_length"}
    h = read_header(model, keys, tensors=True)
    n_layers = h.int_field("{arch}.block_count")
    n_embd = h.int_field("{arch}.embedding_length")
    n_head = h.int_field("{arch}.attention.head_count", 1)
    n_head_kv = h.int_field("{arch}.attention.head_count_kv", n_head)
    k_len = h.int_field("{arch}.attention.key_length", n_embd // n_head)
    v_len = h.int_field("{arch}.attention.value_length", n_embd // n_head)
    blocks = [0.0] * n_layers
    output = 0.0
    for t in h.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layers:
            blocks[int(m.group(1))] += t.n_bytes / MIB
        elif t.name.startswith(("output.", "output_norm.")):
            output += t.n_bytes / MIB
    kv = ctx_size * n_head_kv * (k_len * CACHE_BYTES[cache_type_k or "f16"] + v_len * CACHE_BYTES[cache_type_v or "f16"])
    mm = mmproj.stat().st_size / MIB if mmproj is not None else 0.0
    return Footprint(n_layers, tuple(blocks), output, kv / MIB, mm)
