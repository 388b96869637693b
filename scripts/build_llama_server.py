#!/usr/bin/env python3
"""Get a working llama-server: the configured one, one on PATH, or one built from pinned source.

The source comes from the llama-cpp-python sdist on PyPI, which vendors the whole of llama.cpp
(server included), so a machine that reaches only PyPI can still build it. The result is cached
under ~/.cache/llama-supervisor and never rebuilt while it is there.

Usage:
    python scripts/build_llama_server.py [--backend cpu|cuda|metal|vulkan] [--print-path] [--jobs N]
Environment:
    LLAMA_SERVER_BIN    use this binary instead of building (must exist)
    CMAKE_ARGS          extra arguments passed to cmake's configure step
    LLAMA_SUPERVISOR_CACHE   cache root (default ~/.cache/llama-supervisor)
--source DIR|TARBALL builds from local source (e.g. on a machine without PyPI), see scripts/gpu/.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
}


def cache_root() -> Path:
    env = os.environ.get("LLAMA_SUPERVISOR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llama-supervisor"


def install_dir(backend: str) -> Path:
    suffix = "" if backend == "cpu" else f"-{backend}"
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}{suffix}"


def cached_binary(backend: str) -> Path:
    return install_dir(backend) / "bin" / "llama-server"


def log(msg: str) -> None:
    print(f"[build-llama-server] {msg}", file=sys.stderr, flush=True)


def fetch_source(workdir: Path) -> Path:
    """Download and unpack the sdist; return the vendored llama.cpp directory."""
    sdist_dir = cache_root() / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    sdist = sdist_dir / name
    if not sdist.exists():
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist from PyPI (~77 MB)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "-d", str(sdist_dir), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
            check=True, stdout=sys.stderr,
        )
        candidates = sorted(sdist_dir.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}*.tar.gz"))
        if not candidates:
            raise SystemExit(f"sdist not found in {sdist_dir} after download")
        sdist = candidates[0]
    log(f"unpacking {sdist.name}")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(workdir, members=members, filter="data")
    return workdir / prefix.rstrip("/")


def unpack_source(source: Path, workdir: Path) -> Path:
    """A llama.cpp folder, or a tarball with one llama.cpp folder in it (scripts/gpu/bundle_source.sh)."""
    if source.is_dir():
        return source
    with tarfile.open(source) as tar:
        tar.extractall(workdir, filter="data")
    found = [p.parent for p in workdir.glob("*/CMakeLists.txt")]
    if len(found) != 1:
        raise SystemExit(f"{source}: expected one llama.cpp folder inside, found {found}")
    return found[0]


def build(backend: str, jobs: int, source: Path | None = None) -> Path:
    target = cached_binary(backend)
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        src = unpack_source(source, Path(tmp)) if source else fetch_source(Path(tmp))
        build_dir = Path(tmp) / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = [
            "cmake", "-S", str(src), "-B", str(build_dir), *generator,
            "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DGGML_NATIVE=OFF", *BACKEND_FLAGS[backend],
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        log("configuring: " + shlex.join(configure))
        subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
        log(f"compiling llama-server with {jobs} jobs (a few minutes on 2 cores; progress below)")
        # Progress goes to stderr: stdout carries only the resulting path, for scripts.
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
                       check=True, stdout=sys.stderr)
        built = build_dir / "bin" / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename so a half-written binary never looks like a cached one.
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)
    log(f"installed {target}")
    return target


def resolve(backend: str, jobs: int, source: Path | None = None) -> Path:
    configured = os.environ.get("LLAMA_SERVER_BIN")
    if configured:
        path = Path(configured).expanduser()
        if not os.access(path, os.X_OK):
            raise SystemExit(f"LLAMA_SERVER_BIN={configured} is not an executable file")
        return path
    target = cached_binary(backend)
    if os.access(target, os.X_OK):
        return target
    # Two setups at once (parallel checkouts, CI next to a developer) must not build into one cache twice:
    # the second waits for the first, then finds the binary.
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(target, os.X_OK):
            return target
        return build(backend, jobs, source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(BACKEND_FLAGS), default="cpu")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--print-path", action="store_true", help="only print where the binary would be cached")
    parser.add_argument("--source", type=Path, help="llama.cpp source folder or tarball to build instead of the sdist")
    args = parser.parse_args()
    if args.print_path:
        print(cached_binary(args.backend))
        return
    print(resolve(args.backend, args.jobs, args.source))


if __name__ == "__main__":
    main()
