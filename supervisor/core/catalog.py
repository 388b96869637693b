"""Which profile a request's `model` names: ids and aliases across the profiles folder. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    id: str  # the profile's name
    aliases: tuple[str, ...]
    file: str


def name_problems(entries: Sequence[Entry]) -> list[tuple[str, str, str]]:
    """(file, field, message) for every id or alias that another profile already answers to: a model name
    must pick one profile, or routing would depend on the order files are read."""
    owner: dict[str, Entry] = {}
    out: list[tuple[str, str, str]] = []
    for e in entries:
        for field, name in [("name", e.id), *(("aliases", a) for a in e.aliases)]:
            prev = owner.get(name)
            if prev is not None and prev is not e:
                what = "name" if name == prev.id else "an alias"
                out.append((e.file, field, f"'{name}' is already {what} of profile '{prev.id}' ({prev.file})"))
            else:
                owner[name] = e
    return out


def resolve(requested: str | None, names: Mapping[str, str], default: str, *, strict: bool) -> str | None:
    """The profile id for a request. `names` maps every id and alias to its id. No model named → the
    default. Not strict (one profile, as before there were several): any name goes to the default, since
    OpenAI clients always send one. Strict: an unknown name → None (the caller answers 404)."""
    if not requested:
        return default
    found = names.get(requested)
    if found is not None:
        return found
    return None if strict else default
