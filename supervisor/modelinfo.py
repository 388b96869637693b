"""Facts about a GGUF model read from its metadata (memory-mapped: no weights are loaded)."""

from __future__ import annotations

from pathlib import Path


def read_fields(path: Path, names: tuple[str, ...]) -> dict[str, object]:
    """Blocking; call through asyncio.to_thread."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, object] = {}
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    out["general.architecture"] = arch
    for name in names:
        key = name.replace("{arch}", str(arch))
        f = reader.get_field(key)
        if f is not None:
            out[name] = f.contents()
    return out


def block_count(path: Path) -> int | None:
    """The model's layer count, or None when the file does not say (or cannot be read)."""
    try:
        value = read_fields(path, ("{arch}.block_count",)).get("{arch}.block_count")
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return int(value) if isinstance(value, int) else None
