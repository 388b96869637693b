"""A real systemd (the distribution's, as PID 1) in private namespaces, for testing the unit as it really runs.

Nothing on the host changes. systemd gets its own PID, mount, UTS, IPC and cgroup namespaces; its root is an
overlay of the host's `/` whose upper layer is a tmpfs (every write inside — the installer, useradd, /etc,
/opt, /var, the journal — is thrown away with the namespace), with its own /dev, /run and /tmp (Debian's
tmpfiles rules empty /tmp at boot: the host's must never be visible to it), a read-only /sys and /proc/sys, and
a cgroup2 hierarchy rooted in a fresh child cgroup of the host's. The network namespace is shared, so the
unit's HTTP port is reachable from the test, and the installer can reach PyPI.

The host side runs `python sdbox.py ns-init` under `unshare`; that process becomes PID 1 of the new PID namespace,
moves itself into the new cgroup, re-executes itself in a new cgroup namespace (`ns-root`), builds the root,
pivots into it and becomes systemd. Closing the box kills that PID 1: the kernel then kills everything else in
the namespace, the mounts go with it, and the cgroups are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Capabilities systemd's PID 1 does not get: it must not load kernel modules, set the clock, etc. on the host.
DROPPED_CAPS = ("sys_module", "sys_time", "sys_rawio", "syslog", "net_admin", "mac_admin", "mac_override",
                "wake_alarm", "block_suspend", "audit_control")
SYSTEMD = "/lib/systemd/systemd"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class BoxError(Exception):
    """The box cannot be built here (not root, namespaces forbidden, no cgroup2, no systemd)."""


# ---------------------------------------------------------------- inside the namespaces

def _run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _ns_init() -> None:
    """PID 1 of the new PID namespace, still in the host's cgroup namespace."""
    Path(os.environ["SDBOX_CGROUP"], "cgroup.procs").write_text("0")
    os.execvp("unshare", ["unshare", "--cgroup", sys.executable, __file__, "ns-root"])


def _ns_root() -> None:
    """Build the root (overlay over the host's /, own /dev /run /tmp), pivot into it, become systemd."""
    base = Path(os.environ["SDBOX_WORK"]) / "ns"
    base.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "mode=755", "sdbox", str(base))
    for d in ("upper", "work", "root"):
        (base / d).mkdir()
    root = base / "root"
    _run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={base}/upper,workdir={base}/work",
         str(root))
    _run("mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", f"{root}/proc")
    for p in ("sys", "sysrq-trigger"):  # the kernel's knobs stay read-only
        if (root / "proc" / p).exists():
            _run("mount", "--bind", f"{root}/proc/{p}", f"{root}/proc/{p}")
            _run("mount", "-o", "remount,bind,ro", f"{root}/proc/{p}")
    _run("mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", f"{root}/sys")
    _run("mount", "-t", "cgroup2", "-o", "nosuid,nodev,noexec", "cgroup2", f"{root}/sys/fs/cgroup")
    dev = root / "dev"
    _run("mount", "-t", "tmpfs", "-o", "mode=755,nosuid", "dev", str(dev))
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9), ("tty", 5, 0)):
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)
    (dev / "pts").mkdir()
    (dev / "shm").mkdir()
    _run("mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec", "devpts",
         f"{dev}/pts")
    _run("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "shm", f"{dev}/shm")
    os.symlink("pts/ptmx", dev / "ptmx")
    os.symlink("/proc/self/fd", dev / "fd")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", dev / name)
    console = Path(os.environ["SDBOX_WORK"]) / "console.log"
    console.touch()
    (dev / "console").touch()
    _run("mount", "--bind", str(console), f"{dev}/console")
    _run("mount", "-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "run", f"{root}/run")
    _run("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmp", f"{root}/tmp")
    # Host mounts that the overlay of / does not show (it holds the root filesystem only), read-only: e.g. the
    # driver libraries a container runtime binds in, for scripts/gpu/device_proof.py.
    for path in filter(None, os.environ.get("SDBOX_BINDS", "").split(":")):
        if (root / path.lstrip("/")).exists():
            _run("mount", "--bind", path, f"{root}{path}")
            _run("mount", "-o", "remount,bind,ro", f"{root}{path}")
    socket.sethostname("sdbox")
    os.chdir(root)
    (root / ".oldroot").mkdir()
    _run("pivot_root", ".", ".oldroot")
    os.chdir("/")
    _run("umount", "-l", "/.oldroot")
    os.rmdir("/.oldroot")
    env = {"container": "sdbox", "PATH": PATH, "LANG": "C.UTF-8"}
    caps = ",".join(f"-{c}" for c in DROPPED_CAPS)
    os.execve("/usr/bin/setpriv", ["setpriv", "--bounding-set", caps, SYSTEMD, "--system", "--unit=basic.target"],
              env)


# ---------------------------------------------------------------- on the host

def _cgroup2_root() -> Path:
    for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (p / "cgroup.procs").exists() and (p / "cgroup.subtree_control").exists():
            return p
    raise BoxError("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: systemd needs one")


def preflight() -> None:
    """Raise BoxError, saying what is missing, when this machine cannot run the box."""
    if os.geteuid() != 0:
        raise BoxError("needs root (it mounts, and unshares PID/mount/cgroup namespaces)")
    missing = [c for c in ("unshare", "nsenter", "setpriv", "pivot_root", "mount", "umount")
               if shutil.which(c) is None]
    if not os.access(SYSTEMD, os.X_OK):
        missing.append(SYSTEMD)
    if missing:
        raise BoxError(f"missing {', '.join(missing)}: scripts/setup.sh installs Debian's systemd (as root)")
    _cgroup2_root()
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup",
                            "--propagation", "private", "true"], check=False, capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        raise BoxError("the kernel refused new PID/mount/UTS/IPC/cgroup namespaces (unshare: "
                       f"{probe.stderr.strip() or probe.returncode}); a container without CAP_SYS_ADMIN or with "
                       "user/namespace restrictions cannot run this test, CI must allow them")


class Box:
    """A booted systemd. `run` executes a command inside (all its namespaces), with a clean root environment."""

    def __init__(self, work: Path, init_pid: int, unshare: subprocess.Popen[bytes], cgroup: Path) -> None:
        self.work, self.pid, self._unshare, self.cgroup = work, init_pid, unshare, cgroup

    @property
    def root(self) -> Path:
        """The box's / seen from the host: writes here land in the box's throw-away upper layer."""
        return Path(f"/proc/{self.pid}/root")

    def run(self, *argv: str, timeout: float = 60, check: bool = False, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-p", "-C", "--", "env", "-i", f"PATH={PATH}",
               "LANG=C.UTF-8", *extra, *argv]
        cp = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, input=input)
        if check and cp.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
        return cp

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """journalctl -o json entries (this boot)."""
        out = self.run("journalctl", "-b", "--no-pager", "-o", "json", *args, timeout=60).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def pids(self, comm: str) -> list[int]:
        out = self.run("pgrep", "-x", comm).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: the kernel kills all the rest
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._unshare.wait(timeout=30)
        _remove_cgroup(self.cgroup)


def _remove_cgroup(cg: Path) -> None:
    """Children first; a cgroup whose last process is still exiting refuses for a moment, so retry briefly."""
    deadline = time.monotonic() + 10
    while cg.exists():
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            cg.rmdir()
        if not cg.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def booted(timeout: float = 90, binds: tuple[str, ...] = ()) -> Iterator[Box]:
    """Boot a box, yield it once systemd says the system is running (or degraded); always tear it down.
    `binds`: host paths (absolute, without ':') to show read-only at the same place inside."""
    preflight()
    work = Path(tempfile.mkdtemp(prefix="sdbox-"))
    cgroup = _cgroup2_root() / f"sdbox.{os.getpid()}.{work.name}"
    cgroup.mkdir()
    env = {**os.environ, "SDBOX_WORK": str(work), "SDBOX_CGROUP": str(cgroup), "SDBOX_BINDS": ":".join(binds)}
    log = open(work / "boot.log", "wb")  # closed in finally
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--propagation",
                                "private", sys.executable, __file__, "ns-init"],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    box: Box | None = None
    try:
        init = _wait(lambda: _child_of(unshare.pid), 10, "the namespace's PID 1")
        box = Box(work, init, unshare, cgroup)
        _wait(lambda: Path(f"/proc/{init}/root/run/systemd/private").exists() or None, timeout,
              "systemd's private socket", lambda: unshare.poll() is not None)
        state = box.run("systemctl", "is-system-running", "--wait", timeout=timeout).stdout.strip()
        if state not in ("running", "degraded"):
            raise AssertionError(f"systemd did not come up: is-system-running={state!r}")
        yield box
    except BaseException:
        sys.stderr.write(f"--- sdbox boot log:\n{_tail(work / 'boot.log')}\n"
                         f"--- systemd's console:\n{_tail(work / 'console.log')}\n")
        raise
    finally:
        if box is not None:
            box.close()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(unshare.pid, signal.SIGKILL)
            unshare.wait(timeout=30)
            _remove_cgroup(cgroup)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def _child_of(pid: int) -> int | None:
    """The first child of `pid` (from /proc/*/stat: /proc/PID/task/PID/children needs CONFIG_PROC_CHILDREN)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            return int(stat_file.parent.name)
    return None


def _wait(probe: Callable[[], Any], timeout: float, what: str, dead: Callable[[], bool] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if dead is not None and dead():
            raise AssertionError(f"the box died before {what} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


if __name__ == "__main__":
    {"ns-init": _ns_init, "ns-root": _ns_root}[sys.argv[1]]()
