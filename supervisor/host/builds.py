"""Which llama-server build each profile runs: the binary's real path, checksum and version, the last good build
(the one that last passed the upgrade canary, kept runnable), the golden answers recorded with it, and the
candidates that failed (not tried again until they change).

Blocking (hashing a binary of tens to hundreds of MB, copying it, the JSON file): call through
asyncio.to_thread from the event loop. Kept in `builds.json` in the state directory, written whole and
renamed over (as learned settings are, host/memory.py).

Why a copy of the last good build: a package upgrade replaces the file behind the profile's path, so the only
way back to the build that worked is one kept aside. The copy goes to `builds/<checksum>/` with the shared
libraries that sit beside the binary (a shared-library build of llama.cpp finds them there through its
$ORIGIN run path); only the last good build's copy is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "builds.json"
KEEP_DIR = "builds"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Build:
    path: str  # as the profile names it
    real_path: str  # symlinks resolved
    sha256: str
    size: int
    mtime_ns: int
    version: str  # what `--version` says

    @property
    def id(self) -> str:
        return self.sha256[:12]

    def label(self) -> str:
        return f"{self.version} [{self.id}]"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Build:
        return cls(str(d["path"]), str(d["real_path"]), str(d["sha256"]), int(d["size"]), int(d["mtime_ns"]),
                   str(d.get("version") or "unknown"))


_sums: dict[tuple[str, int, int, int], str] = {}


def checksum(path: Path) -> str:
    """sha256 of a file, cached per (path, inode, size, mtime): the reloader asks at every change it sees."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _sums:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        _sums[key] = h.hexdigest()
    return _sums[key]


def identify(binary: str, version: str) -> Build:
    """The build a path leads to now. Raises OSError when it is not there."""
    real = Path(binary).resolve(strict=True)
    st = real.stat()
    return Build(str(binary), str(real), checksum(real), st.st_size, st.st_mtime_ns, version)


def watch_paths(binary: str) -> list[str]:
    """The paths whose change means another build at `binary`: the path itself and every symlink on the way to
    the real file (an upgrade that switches `/opt/llama/current` to another release changes that link, not
    the file). Absolute, unresolved: what a folder watch reports."""
    out = [os.path.abspath(binary)]
    followed: set[str] = set()
    todo = [Path(out[0])]
    while todo and len(followed) < 40:  # a symlink loop ends here
        path = todo.pop()
        for prefix in [*reversed(path.parents), path]:
            if not prefix.is_symlink():
                continue
            link = str(prefix)
            if link not in followed:
                followed.add(link)
                if link not in out:
                    out.append(link)
                target = Path(os.readlink(prefix))
                todo.append((target if target.is_absolute() else prefix.parent / target) / path.relative_to(prefix))
            break
    return out


def still_there(b: Build) -> bool:
    """Is the build at its real path still the same file (size, mtime, then the checksum)?"""
    try:
        st = Path(b.real_path).stat()
        return st.st_size == b.size and st.st_mtime_ns == b.mtime_ns and checksum(Path(b.real_path)) == b.sha256
    except OSError:
        return False


class BuildBook:
    """Per profile (its name): the last good build, its kept copy, its golden answers, and rejected candidates."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / FILE_NAME

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _entry(self, profile: str) -> dict[str, Any]:
        e = self._read().get(profile)
        return e if isinstance(e, dict) else {}

    def last_good(self, profile: str) -> Build | None:
        try:
            return Build.from_dict(self._entry(profile)["last_good"])
        except (KeyError, TypeError, ValueError):
            return None

    def golden(self, profile: str) -> dict[str, Any] | None:
        """What the last good build answered to the golden set (core.canary.Measured.as_dict)."""
        g = self._entry(profile).get("golden")
        return g if isinstance(g, dict) else None

    def runnable(self, profile: str) -> str | None:
        """A path that runs the last good build now: its own, if the file is unchanged, else the kept copy."""
        good = self.last_good(profile)
        if good is None:
            return None
        if still_there(good):
            # The path it was given by, while that still leads there (a command line that stays the same), else
            # the real file.
            with contextlib.suppress(OSError):
                if str(Path(good.path).resolve(strict=True)) == good.real_path:
                    return good.path
            return good.real_path
        kept = self.dir / KEEP_DIR / good.id / Path(good.real_path).name
        try:
            return str(kept) if checksum(kept) == good.sha256 else None
        except OSError:
            return None

    def seen(self, profile: str) -> str | None:
        """The checksum of the build the profile's path led to when the last decision was taken."""
        s = self._entry(profile).get("seen")
        return s if isinstance(s, str) else None

    def set_seen(self, profile: str, sha256: str) -> None:
        data = self._read()
        entry: dict[str, Any] = data[profile] if isinstance(data.get(profile), dict) else {}
        if entry.get("seen") != sha256:
            data[profile] = {**entry, "seen": sha256}
            self._write(data)

    def rejected(self, profile: str, build: Build) -> dict[str, Any] | None:
        """Why this candidate failed before (same checksum), or None."""
        r = (self._entry(profile).get("rejected") or {}).get(build.sha256)
        return r if isinstance(r, dict) else None

    def set_good(self, profile: str, build: Build, golden: dict[str, Any] | None) -> None:
        """`build` passed: remember it (and its answers), keep a runnable copy, drop the copy of the one before."""
        self._keep(build)
        data = self._read()
        entry: dict[str, Any] = data[profile] if isinstance(data.get(profile), dict) else {}
        entry = {**entry, "last_good": build.as_dict()}
        if golden is not None:
            entry["golden"] = golden
        entry.get("rejected", {}).pop(build.sha256, None)
        data[profile] = entry
        self._write(data)
        self._prune(data)

    def reject(self, profile: str, build: Build, reasons: list[str], at: str) -> None:
        data = self._read()
        entry: dict[str, Any] = data[profile] if isinstance(data.get(profile), dict) else {}
        rejected = dict(entry.get("rejected") or {})
        rejected[build.sha256] = {"build": build.as_dict(), "reasons": reasons, "at": at}
        # A box sees a handful of releases a month: keep the last few verdicts, not a history.
        entry = {**entry, "rejected": dict(list(rejected.items())[-8:])}
        data[profile] = entry
        self._write(data)

    def _keep(self, build: Build) -> None:
        src = Path(build.real_path)
        dest = self.dir / KEEP_DIR / build.id
        if (dest / src.name).exists():
            return
        tmp = Path(tempfile.mkdtemp(dir=self._keep_root(), prefix=".keep-"))
        try:
            shutil.copy2(src, tmp / src.name)
            for lib in src.parent.glob("lib*.so*"):
                if lib.is_file():
                    shutil.copy2(lib, tmp / lib.name)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _keep_root(self) -> Path:
        root = self.dir / KEEP_DIR
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _prune(self, data: dict[str, Any]) -> None:
        wanted = set()
        for entry in data.values():
            good = entry.get("last_good") if isinstance(entry, dict) else None
            if isinstance(good, dict) and isinstance(good.get("sha256"), str):
                wanted.add(good["sha256"][:12])
        for d in self._keep_root().iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in wanted:
                shutil.rmtree(d, ignore_errors=True)

    def _write(self, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".builds-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.path)
