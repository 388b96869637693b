"""Learned settings: the last run settings that reached ready, per (settings asked for, model file, binary).

Kept in a small JSON file in the state directory so the next start, after a reboot too, begins
with what worked instead of walking the out-of-memory ladder again. The key is the command line the
profile asks for (its GPU layers, context, cache types, ...), so an edited profile never starts with
settings learned for another one; a replaced model or binary (size, mtime) changes it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..core.ladder import RunSettings

FILE_NAME = "learned-settings.json"


def key_for(identity: Sequence[str], model: Path, binary: str) -> str:
    """`identity`: the profile's own command line. Changes when it, the model file or the binary changes."""
    parts = ["\0".join(identity)]
    for p in (Path(model), Path(binary)):
        try:
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}")
        except OSError:
            parts.append(str(p))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


class SettingsMemory:
    """Blocking file I/O: call through asyncio.to_thread from the event loop."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, key: str) -> RunSettings | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return RunSettings.from_dict(entry["settings"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return None

    def save(self, key: str, settings: RunSettings, label: str) -> None:
        data = self._read()
        data[key] = {"label": label, "settings": settings.as_dict()}
        self.save_all(data)

    def forget(self, key: str) -> None:
        data = self._read()
        if data.pop(key, None) is not None:
            self.save_all(data)

    def save_all(self, data: dict[str, dict[str, object]]) -> None:
        # Write a temp file and rename it over: a crash mid-write never leaves half a file.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".learned-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.path)
