#!/usr/bin/env python3
"""The unit's GPU device lines on a real GPU, under a real systemd: DevicePolicy=closed + the DeviceAllow= classes of
systemd/llama-supervisor.service must let CUDA in, and DevicePolicy=closed alone must keep it out.

Run as root on the GPU machine from the checkout (needs Debian's systemd 252 installed there, and a kernel that
allows PID/mount/cgroup namespaces): `sudo python3 scripts/gpu/device_proof.py [--binary CUDA-llama-server]`.
It prints which /proc/devices names the unit's classes match on this driver, then boots systemd in private
namespaces (scripts/sdbox.py; nothing on the host changes), gives it the host's GPU device nodes and the host
mounts the overlay of / does not show (driver libraries a container runtime binds in), and runs `nvidia-smi -L`
(and `llama-server --list-devices` with --binary) as transient services with the unit's device settings, and
without its DeviceAllow= lines as the control. Exit 0 when allowed runs see the GPU and the control does not.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import sdbox  # noqa: E402

UNIT = ROOT / "systemd" / "llama-supervisor.service"
GPU_NODES = ("/dev/nvidia*", "/dev/nvidia-caps/*", "/dev/dri/*")


def unit_device_lines() -> list[str]:
    return re.findall(r"(?m)^DeviceAllow=(.+)$", UNIT.read_text())


def proc_devices() -> dict[str, int]:
    """Character device names → majors, from /proc/devices."""
    names: dict[str, int] = {}
    section = ""
    for line in Path("/proc/devices").read_text().splitlines():
        if line.endswith(":"):
            section = line
        elif section.startswith("Character") and line.split():
            major, name = line.split(None, 1)
            names[name] = int(major)
    return names


def host_binds() -> tuple[str, ...]:
    """Mount points under the system's directories (not / itself): what a container runtime binds in."""
    keep = ("/usr/", "/lib/", "/lib64/", "/lib32/", "/etc/", "/opt/", "/bin/", "/sbin/", "/var/lib/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(keep) and ":" not in point and " " not in point:
            found.append(point)
    return tuple(dict.fromkeys(found))


def copy_nodes(box: sdbox.Box) -> list[str]:
    """The host's GPU device nodes, same numbers and modes, into the box's own /dev."""
    made = []
    for pattern in GPU_NODES:
        for node in sorted(Path("/").glob(pattern.lstrip("/"))):
            st = node.lstat()
            if not stat.S_ISCHR(st.st_mode):
                continue
            target = box.root / str(node).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.mknod(target, st.st_mode, st.st_rdev)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            made.append(f"{node} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    return made


def transient(box: sdbox.Box, props: list[str], argv: list[str]) -> tuple[int, str]:
    cmd = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "-p", "DevicePolicy=closed"]
    for p in props:
        cmd += ["-p", f"DeviceAllow={p}"]
    cp = box.run(*cmd, "--", *argv, timeout=120)
    return cp.returncode, (cp.stdout + cp.stderr).strip().replace("\n", " | ")[:400]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", help="a CUDA llama-server: also run its --list-devices")
    args = ap.parse_args()
    lines = unit_device_lines()
    majors = proc_devices()
    print(f"unit: {', '.join(lines)}")
    for line in lines:
        cls = line.split()[0]
        if cls.startswith("char-"):
            hit = {n: m for n, m in majors.items() if n == cls[5:]}
            print(f"  {cls:22} {'matches ' + str(hit) if hit else 'no driver registers it here'}")
    print("/proc/devices (GPU):", {n: m for n, m in majors.items() if n.startswith(("nvidia", "drm"))})
    failures = 0
    with sdbox.booted(binds=host_binds()) as box:
        print("nodes:", ", ".join(copy_nodes(box)) or "none")
        runs = [["nvidia-smi", "-L"]] + ([[args.binary, "--list-devices"]] if args.binary else [])
        for argv in runs:
            rc, out = transient(box, lines, argv)
            ok = rc == 0 and ("GPU" in out or "CUDA" in out)
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} allowed  {argv[0]}: rc={rc} {out}")
            rc, out = transient(box, [], argv)
            ok = rc != 0 or not ("GPU 0" in out or "CUDA0" in out)
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} control  {argv[0]} (DevicePolicy=closed, no DeviceAllow): rc={rc} {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except sdbox.BoxError as exc:
        sys.exit(f"cannot boot systemd here: {exc}")
