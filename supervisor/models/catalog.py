"""The models a box offers: every `*.yaml` in profiles_dir, each validated against its binary.

A profile that does not validate is not served, and its error is kept (file, fields) for /status and
/v1/models; one bad file never takes the others down. Blocking (file reads, --help probes): call
`scan` through asyncio.to_thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.catalog import Entry, name_problems
from ..spec.loaded import Loaded, load_checked
from ..spec.profile import ProfileError, named_files


@dataclass
class Catalog:
    models: dict[str, Loaded] = field(default_factory=dict)  # id → profile
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # file → ProfileError.as_dict()
    # file → what a rejected profile names (its model may be missing or half copied): watched, to look again
    waiting_on: dict[str, list[str]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # models an upgrade owned as this catalog was resolved: left alone

    def names(self) -> dict[str, str]:
        """Every id and alias → its id."""
        out = {}
        for mid, loaded in self.models.items():
            out[mid] = mid
            out.update(dict.fromkeys(loaded.profile.aliases, mid))
        return out

    def by_file(self) -> dict[Path, str]:
        return {loaded.path: mid for mid, loaded in self.models.items()}


def profile_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if p.is_file())


def scan(folder: Path | None, default: Loaded) -> Catalog:
    """All profiles in `folder` (None: a box of one model, the default alone), plus the default (which may live
    elsewhere, and must be valid: it was loaded already). A name or alias that an earlier file (by name order)
    has already is an error of the later file; the default always keeps its names."""
    cat = Catalog()
    cat.models[default.profile.name] = default
    entries = [Entry(default.profile.name, tuple(default.profile.aliases), str(default.path))]
    for path in profile_files(folder) if folder is not None else []:
        if path.resolve() == default.path.resolve():
            continue
        try:
            loaded = load_checked(path)
        except ProfileError as exc:
            cat.errors[str(path)] = exc.as_dict()
            cat.waiting_on[str(path)] = named_files(path)
            continue
        entry = Entry(loaded.profile.name, tuple(loaded.profile.aliases), str(path))
        clashes = name_problems([*entries, entry])
        if clashes:
            cat.errors[str(path)] = ProfileError(path, [(f, m) for _, f, m in clashes]).as_dict()
            continue
        entries.append(entry)
        cat.models[loaded.profile.name] = loaded
    return cat
