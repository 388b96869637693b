"""The builds book (host/builds.py): real files, symlinks and a state directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from supervisor.host import builds


def _binary(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o755)
    return path


def test_identify_resolves_symlinks_and_hashes(tmp_path: Path) -> None:
    real = _binary(tmp_path / "opt" / "b100" / "llama-server", b"build 100" * 1000)
    link = tmp_path / "current"
    link.symlink_to(real.parent)
    b = builds.identify(str(link / "llama-server"), "b100")
    assert b.path == str(link / "llama-server") and b.real_path == str(real)
    assert b.sha256 == hashlib.sha256(real.read_bytes()).hexdigest() and b.size == real.stat().st_size
    assert b.id == b.sha256[:12] and b.label() == f"b100 [{b.id}]"
    # A symlink switched to another build is another build.
    other = _binary(tmp_path / "opt" / "b200" / "llama-server", b"build 200")
    link.unlink()
    link.symlink_to(other.parent)
    assert builds.identify(str(link / "llama-server"), "b200").sha256 != b.sha256
    assert builds.Build.from_dict(b.as_dict()) == b


def test_last_good_is_kept_runnable_after_the_file_is_replaced(tmp_path: Path) -> None:
    binary = _binary(tmp_path / "bin" / "llama-server", b"good build")
    _binary(tmp_path / "bin" / "libggml.so.1", b"a shared library beside it")
    book = builds.BuildBook(tmp_path / "state")
    good = builds.identify(str(binary), "b1")
    assert book.last_good("p") is None and book.runnable("p") is None
    book.set_good("p", good, {"build": good.label(), "answers": []})
    assert book.last_good("p") == good and book.golden("p") == {"build": good.label(), "answers": []}
    assert book.runnable("p") == str(binary)  # unchanged: its own path
    # A package upgrade replaces the file: the kept copy (with its libraries) runs the last good build.
    os.replace(_binary(tmp_path / "new", b"new build"), binary)
    kept = book.runnable("p")
    assert kept is not None and kept != str(binary) and Path(kept).read_bytes() == b"good build"
    assert (Path(kept).parent / "libggml.so.1").exists() and os.access(kept, os.X_OK)
    # A newer good build replaces the copy of the old one.
    newer = builds.identify(str(binary), "b2")
    book.set_good("p", newer, None)
    assert not Path(kept).exists() and book.golden("p") is not None  # the old answers stay until new ones come
    assert book.runnable("p") == str(binary)


def test_rejected_candidates_are_remembered_by_checksum(tmp_path: Path) -> None:
    binary = _binary(tmp_path / "llama-server", b"bad build")
    book = builds.BuildBook(tmp_path / "state")
    bad = builds.identify(str(binary), "b3")
    book.reject("p", bad, ["image: answered 500"], "2026-12-04T00:00:00Z")
    assert book.rejected("p", bad) == {"build": bad.as_dict(), "reasons": ["image: answered 500"],
                                       "at": "2026-12-04T00:00:00Z"}
    assert book.rejected("other", bad) is None
    # The same file changed again is a new candidate.
    _binary(binary, b"bad build, fixed")
    assert book.rejected("p", builds.identify(str(binary), "b4")) is None
    # A state file that is not ours is read as empty, not an error.
    book.path.write_text("[1, 2]")
    assert book.last_good("p") is None and book.rejected("p", bad) is None


def test_seen_is_kept_per_profile(tmp_path: Path) -> None:
    book = builds.BuildBook(tmp_path / "state")
    assert book.seen("p") is None
    book.set_seen("p", "abc")
    book.set_seen("q", "def")
    assert (book.seen("p"), book.seen("q")) == ("abc", "def")


def test_watch_paths_follow_every_symlink(tmp_path: Path) -> None:
    real = _binary(tmp_path / "opt" / "b100" / "bin" / "llama-server", b"x")
    (tmp_path / "opt" / "current").symlink_to("b100")  # relative, as `ln -s b100 current` makes it
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "llama-server").symlink_to(tmp_path / "opt" / "current" / "bin" / "llama-server")
    paths = builds.watch_paths(str(tmp_path / "usr" / "bin" / "llama-server"))
    assert paths == [str(tmp_path / "usr" / "bin" / "llama-server"), str(tmp_path / "opt" / "current")]
    assert builds.watch_paths(str(real)) == [str(real)]
