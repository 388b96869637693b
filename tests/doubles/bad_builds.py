"""Candidate llama-server "builds" for the upgrade tests: the real llama-server behind a small wrapper that
behaves the way a bad release does (or an honest one, to show the canary lets a good build through).

Kinds:
- `honest`: the same server (exec, same process): must pass and switch.
- `no-vision`: drops `--mmproj` (a release whose vision path is gone): image requests fail.
- `dies`: forwards to the real server and aborts on the Nth chat completion (N=1: at the canary's warmup;
  larger: after the switch, within probation).
- `slow`: pinned to one core with a four-token batch (`--batch-size 4 --ubatch-size 4`; 1 aborts at load): prompt processing is
  many times slower, far beyond any noise.
- `renamed`: `--threads` is called `--n-threads` (its --help says so, and it refuses the old spelling the way
  llama-server refuses an unknown flag).

`write_build(path, real, kind, n)` writes an executable for one test; `--version` says `build N+<n>` so each
candidate reads as a newer release.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

KINDS = ("honest", "no-vision", "dies", "slow", "renamed")


def _version(real: str, bump: int) -> None:
    out = subprocess.run([real, "--version"], capture_output=True, text=True, check=False)
    text = re.sub(r"\(build (\d+),", lambda m: f"(build {int(m.group(1)) + bump},", out.stdout + out.stderr)
    print(text, file=sys.stderr, end="", flush=True)
    sys.exit(out.returncode)


def _without(args: list[str], flag: str, takes_value: bool) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        else:
            out.append(a)
    return out


def main(real: str, kind: str, n: int) -> None:
    args = sys.argv[1:]
    if args[:1] == ["--version"]:
        _version(real, n)
    if kind == "renamed":
        if args[:1] == ["--help"]:
            out = subprocess.run([real, "--help"], capture_output=True, text=True, check=False)
            print(re.sub(r"--threads\b", "--n-threads", out.stdout), end="", flush=True)
            sys.exit(out.returncode)
        if "--threads" in args:
            print("error: invalid argument: --threads", file=sys.stderr, flush=True)
            sys.exit(1)
        args = ["--threads" if a == "--n-threads" else a for a in args]
    elif args[:1] in (["--help"], ["--list-devices"]):
        pass
    elif kind == "no-vision":
        args = _without(_without(args, "--mmproj", True), "--no-mmproj-offload", False)
    elif kind == "slow":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        args = [*args, "--batch-size", "4", "--ubatch-size", "4"]
    elif kind == "dies":
        from poison_llama_server import forward

        seen = [0]

        def count(path: str, _body: bytes) -> None:
            if path.endswith("/completions") or path == "/completion":
                seen[0] += 1
                if seen[0] >= n:
                    print(f"GGML_ASSERT(a bad release) failed at completion {seen[0]}", file=sys.stderr, flush=True)
                    os.abort()

        forward(real, args, count)
        return
    os.execv(real, [real, *args])


def write_build(path: Path, real: str, kind: str, n: int = 1) -> Path:
    from doubles.launcher import write_launcher  # the test side only: the double itself never needs it

    assert kind in KINDS, kind
    return write_launcher(path, "bad_builds", f"main({real!r}, {kind!r}, {n})")
