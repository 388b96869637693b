"""systemd: the settings file's profile name, start extensions only before the first READY=1, and the unit as
installed by scripts/install-systemd.sh under a real systemd (sdbox.py: PID 1 of private namespaces)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sdbox
from support import running, wait_for

from supervisor.core.lifecycle import State
from supervisor.host.sdnotify import Notifier, extends_start
from supervisor.spec.settings import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = "llama-supervisor"
SERVICE = f"{UNIT}.service"
# The test's drop-in shortens the watchdog so each hang is caught in seconds; the shipped unit says 30 s, and the
# daemon follows whatever WATCHDOG_USEC systemd passes it. Everything else is the unit as shipped.
WATCHDOG_S = 10
MARGIN_S = 3.0  # journald's delay in stamping PID 1's message, on a loaded 2-core box


# ---------------------------------------------------------------- settings: `profile: NAME`

def test_profile_name_in_the_settings_file_is_looked_up_in_profiles_dir(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "supervisor.yaml"
    monkeypatch.setenv("LLAMA_SUPERVISOR_CONFIG", str(f))
    monkeypatch.delenv("LLAMA_SUPERVISOR_PROFILES_DIR", raising=False)
    cases = [
        ("profiles_dir: profiles\nprofile: demo\n", tmp_path / "profiles" / "demo.yaml"),
        ("profiles_dir: /etc/llama-supervisor/profiles\nprofile: qwen3.5-vl\n",
         Path("/etc/llama-supervisor/profiles/qwen3.5-vl.yaml")),
        ("profiles_dir: profiles\nprofile: demo.yml\n", tmp_path / "profiles" / "demo.yml"),
        ("profiles_dir: profiles\nprofile: other/box.yaml\n", tmp_path / "other" / "box.yaml"),  # a path stays one
        ("profile: box.yaml\n", tmp_path / "box.yaml"),  # no profiles_dir: next to the settings file
    ]
    for text, expected in cases:
        f.write_text(text)
        assert load_config().resolved_profile() == expected, text
    # The shipped settings file names its profile this way.
    f.write_text((ROOT / "configs" / "supervisor.yaml").read_text())
    assert load_config().resolved_profile() == Path("/etc/llama-supervisor/profiles/qwen3-vl-24gb.yaml")
    # A profiles_dir from the environment counts as well.
    f.write_text("profile: demo\n")
    monkeypatch.setenv("LLAMA_SUPERVISOR_PROFILES_DIR", str(tmp_path / "env-profiles"))
    assert load_config().resolved_profile() == tmp_path / "env-profiles" / "demo.yaml"


# ---------------------------------------------------------------- EXTEND_TIMEOUT_USEC

@pytest.mark.parametrize("state", list(State))
def test_start_is_extended_only_before_the_first_ready(state: State) -> None:
    before = state in (State.STARTING, State.WARMING, State.BACKOFF)
    assert extends_start(state, ready_sent=False) is before
    assert extends_start(state, ready_sent=True) is False  # the unit is active: it would push the watchdog out


def test_keepalive_fields_follow_the_watchdog() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.keepalive_period_s == 10.0
    assert n.keepalive_fields(State.STARTING) == ["WATCHDOG=1", "EXTEND_TIMEOUT_USEC=30000000"]
    n.send("READY=1", "STATUS=ready")
    assert n.keepalive_fields(State.STARTING) == ["WATCHDOG=1"]
    quiet = Notifier({"NOTIFY_SOCKET": "/nonexistent"})  # no WatchdogSec: extensions alone, every 10 s
    assert quiet.keepalive_fields(State.READY) == []
    assert quiet.keepalive_fields(State.WARMING) == ["EXTEND_TIMEOUT_USEC=30000000"]


async def test_extensions_repeat_during_a_long_first_start_and_stop_at_ready(tmp_path: Path, write_profile) -> None:
    """The first start is held up for real (the child's port is taken, llama-server exits, the supervisor
    retries); EXTEND_TIMEOUT_USEC keeps coming meanwhile. Once READY=1 went out, none, not even while
    llama-server restarts after a SIGKILL."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "150000",
                         "WATCHDOG_PID": str(os.getpid())})
    try:
        async with running(tmp_path, write_profile(port=port), notifier=notifier, breaker_failures=1000) as d:
            await wait_for(lambda: sum("EXTEND_TIMEOUT_USEC=150000" in m for m in drain()) >= 3,
                           what="three start extensions while the port is taken")
            assert not d.default.runner.ready
            blocker.close()
            await wait_for(lambda: d.default.runner.ready, what="ready once the port is free")
            await wait_for(lambda: any(m.startswith("READY=1") for m in drain()), what="READY=1")
            pid = d.default.runner.child.pid
            os.kill(pid, 9)
            await wait_for(lambda: d.default.runner.ready and d.default.runner.child is not None and d.default.runner.child.pid != pid,
                           what="ready again after the SIGKILL")
            await wait_for(lambda: sum(m == "WATCHDOG=1" for m in drain()[-3:]) >= 2, what="pings after it")
        msgs = drain()
    finally:
        blocker.close()
        sock.close()
    ready_at = next(i for i, m in enumerate(msgs) if m.startswith("READY=1"))
    assert any("STATUS=backoff" in m for m in msgs[:ready_at]), msgs[:ready_at]
    assert not [m for m in msgs[ready_at:] if "EXTEND_TIMEOUT_USEC" in m], msgs[ready_at:]
    assert any(m.startswith("STATUS=loading model") for m in msgs[ready_at:])  # the child did restart


# ---------------------------------------------------------------- the unit under a real systemd

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(probe: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


class Unit:
    """The installed unit inside a box: its properties, its journal, its processes."""

    def __init__(self, box: sdbox.Box, port: int) -> None:
        self.box, self.port = box, port

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def prop(self, name: str) -> str:
        return self.show(name)[name]

    def ready(self) -> bool:
        s = self.show("ActiveState", "StatusText")
        return s["ActiveState"] == "active" and s["StatusText"] == "ready"

    def children(self) -> list[int]:
        return self.box.pids("llama-server")

    def health(self) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    def daemon_lines(self, pid: str) -> list[str]:
        return [e["MESSAGE"] for e in self.box.journal("-u", UNIT, f"_PID={pid}") if isinstance(e.get("MESSAGE"), str)]

    def pid1(self, priority: str | None = None) -> list[dict[str, Any]]:
        return self.box.journal("_PID=1", *(["-p", priority] if priority else []))

    def watchdog_timeouts(self) -> list[int]:
        """Monotonic µs of PID 1's 'Watchdog timeout' messages about the unit."""
        return [int(e["__MONOTONIC_TIMESTAMP"]) for e in self.pid1()
                if e.get("UNIT") == SERVICE and "Watchdog timeout" in str(e.get("MESSAGE"))]

    def freeze_until_watchdog(self, figures: dict[str, Any], key: str) -> None:
        """SIGSTOP the daemon's whole process (event loop included): systemd must notice WatchdogSec after the
        last ping, kill it and start it again."""
        pid, nr = self.prop("MainPID"), int(self.prop("NRestarts"))
        before = len(self.watchdog_timeouts())
        self.box.run("kill", "-STOP", pid, check=True)
        time.sleep(0.5)  # a ping already on its way is still counted
        last_ping = int(self.prop("WatchdogTimestampMonotonic"))
        try:
            fired = _until(lambda: self.watchdog_timeouts()[before:], WATCHDOG_S + 20,
                           f"systemd's watchdog on the frozen daemon {pid}", step=0.5)
        except AssertionError:
            self.box.run("kill", "-CONT", pid)
            raise
        late = (fired[0] - last_ping) / 1e6
        figures[key] = f"watchdog fired {late:.1f} s after the last ping (WatchdogSec={WATCHDOG_S})"
        assert late <= WATCHDOG_S + MARGIN_S, f"{key}: the watchdog's deadline was pushed out: {late:.1f} s"
        _until(lambda: int(self.prop("NRestarts")) > nr and self.ready() and len(self.children()) == 1, 60,
               "the unit restarted by the watchdog, ready again")
        assert self.prop("MainPID") != pid


def _seed(box: sdbox.Box, llama_server: str, models: tuple[Path, Path], port: int) -> None:
    """The checkout (read by the installer), and a built llama-server and the demo models in the place where the
    installer's build step finds them cached, written into the box's own (throw-away) root."""
    shutil.copytree(ROOT, box.root / "mnt/src", ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info", "bench-results", "build"))
    cache = box.root / "opt/llama-supervisor/cache"
    (cache / "llama.cpp-0.3.36/bin").mkdir(parents=True)
    shutil.copy2(llama_server, cache / "llama.cpp-0.3.36/bin/llama-server")
    (cache / "models").mkdir()
    shutil.copy2(models[0], cache / "models/tiny-qwen3vl.gguf")
    shutil.copy2(models[1], cache / "models/mmproj-tiny-qwen3vl.gguf")


def _configure(box: sdbox.Box, port: int) -> None:
    """The documented edits only: the demo profile into profiles_dir, the settings file names it and a port."""
    etc = box.root / "etc/llama-supervisor"
    demo = (ROOT / "configs/demo.yaml").read_text().replace("${LLAMA_SUPERVISOR_CACHE:-~/.cache/llama-supervisor}",
                                                            "/opt/llama-supervisor/cache")
    (etc / "profiles/demo.yaml").write_text(demo)
    lines = (etc / "supervisor.yaml").read_text().splitlines()
    edits = {"port:": f"port: {port}", "profile:": "profile: demo   # a name in profiles_dir"}
    (etc / "supervisor.yaml").write_text("\n".join(
        next((new for key, new in edits.items() if ln.startswith(key)), ln) for ln in lines) + "\n")
    dropin = box.root / f"etc/systemd/system/{SERVICE}.d"
    dropin.mkdir(parents=True)
    (dropin / "test-watchdog.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}\n")
    box.systemctl("daemon-reload").check_returncode()


def _unit_warnings(unit: Unit) -> list[str]:
    """PID 1's warnings about the unit, except the ones this test provokes on purpose."""
    provoked = ("Watchdog timeout", "Main process exited", "Failed with result", "Failed to start",
                "Killing process", "Processes still around")
    out = []
    for e in unit.pid1("warning"):
        msg = str(e.get("MESSAGE"))
        if (e.get("UNIT") == SERVICE or UNIT in msg) and not any(p in msg for p in provoked):
            out.append(msg)
    return out


# ~3 minutes here (a minute of it pip installing from PyPI); the box is torn down on a timeout too (pytest-timeout's
# signal method raises inside the test, so sdbox.booted's cleanup runs).
@pytest.mark.timeout(480)
def test_the_unit_under_a_real_systemd(llama_server: str, tiny_vl: tuple[Path, Path]) -> None:
    try:
        sdbox.preflight()
    except sdbox.BoxError as exc:
        pytest.fail(f"cannot boot a real systemd on this machine: {exc}")
    figures: dict[str, Any] = {}
    port = _free_port()
    t_all = time.monotonic()
    with sdbox.booted() as box:
        box_pid, cgroup = box.pid, box.cgroup
        figures["boot"] = f"{box.run('systemctl', '--version').stdout.split()[1]} as PID 1 in " \
                          f"{time.monotonic() - t_all:.1f} s"
        unit = Unit(box, port)
        _seed(box, llama_server, tiny_vl, port)

        # The installer refuses an interpreter the service could not run (ProtectHome=yes).
        (box.root / "root/pyenv/bin").mkdir(parents=True)
        os.symlink("/usr/bin/python3", box.root / "root/pyenv/bin/python3")
        cp = box.run("bash", "-c", "cd /mnt/src && scripts/install-systemd.sh", env={"PYTHON": "/root/pyenv/bin/python3"})
        assert cp.returncode != 0 and "ProtectHome" in cp.stderr, cp.stderr
        assert not (box.root / "opt/llama-supervisor/.venv").exists()

        t = time.monotonic()
        cp = box.run("bash", "-c", "cd /mnt/src && scripts/install-systemd.sh", timeout=400)
        assert cp.returncode == 0, f"installer failed:\n{cp.stdout}\n{cp.stderr}"
        figures["install"] = f"scripts/install-systemd.sh in {time.monotonic() - t:.1f} s"
        groups = box.run("id", "-Gn", UNIT).stdout.split()
        assert "video" in groups, groups
        verify = box.run("systemd-analyze", "verify", f"/etc/systemd/system/{SERVICE}")
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
        assert box.run("readlink", "-f", "/opt/llama-supervisor/.venv/bin/python").stdout.startswith("/usr/")
        _configure(box, port)

        # start returns only once READY=1 came, i.e. after the warmup: /health is 200 at that very moment.
        t = time.monotonic()
        cp = box.systemctl("start", UNIT, timeout=120)
        took = time.monotonic() - t
        health = unit.health()
        s = unit.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
        assert cp.returncode == 0, cp.stderr + box.run("journalctl", "-u", UNIT, "--no-pager", "-n", "30").stdout
        assert health == 200 and (s["ActiveState"], s["SubState"], s["StatusText"]) == ("active", "running", "ready"), s
        figures["start"] = f"systemctl start returned in {took:.2f} s, /health {health} at once, {s}"
        status = box.systemctl("status", UNIT, "--no-pager").stdout
        assert 'Status: "ready"' in status, status

        # The journal: every line of the daemon is a JSON event.
        lines = unit.daemon_lines(s["MainPID"])
        events = [json.loads(line)["event"] for line in lines]
        assert len(events) >= 5 and "listening" in events, lines
        figures["journal"] = f"{len(lines)} daemon lines, all JSON: {sorted(set(events))}"

        # systemctl reload = SIGHUP: the daemon reloads, same process.
        cp = box.systemctl("reload", UNIT)
        assert cp.returncode == 0, cp.stderr
        _until(lambda: any(json.loads(ln).get("source") == "SIGHUP" for ln in unit.daemon_lines(s["MainPID"])), 20,
               "the daemon's reload event (source SIGHUP)")
        assert unit.prop("MainPID") == s["MainPID"] and unit.ready()

        # A hung event loop, steady state.
        unit.freeze_until_watchdog(figures, "watchdog")

        # llama-server killed from outside: the daemon restarts it; the unit stays active, systemd never restarts.
        main, nr = unit.prop("MainPID"), unit.prop("NRestarts")
        (child,) = unit.children()
        t = time.monotonic()
        box.run("kill", "-9", str(child), check=True)
        _until(lambda: unit.children() not in ([], [child]) and unit.ready(), 60, "a new llama-server, ready")
        figures["child-restart"] = f"SIGKILL llama-server -> ready again in {time.monotonic() - t:.2f} s"
        assert (unit.prop("MainPID"), unit.prop("NRestarts")) == (main, nr) and unit.health() == 200

        # ... and right after that restart the watchdog still works (no start extension while active).
        unit.freeze_until_watchdog(figures, "watchdog-after-child-restart")

        # The daemon itself killed: Restart=on-failure brings both back; its llama-server does not outlive it.
        main, nr = unit.prop("MainPID"), int(unit.prop("NRestarts"))
        (child,) = unit.children()
        t = time.monotonic()
        box.run("kill", "-9", main, check=True)
        _until(lambda: int(unit.prop("NRestarts")) == nr + 1 and unit.ready(), 60, "Restart= after a SIGKILL")
        figures["daemon-restart"] = f"SIGKILL daemon -> ready again in {time.monotonic() - t:.1f} s (RestartSec=5)"
        assert unit.children() not in ([], [child]) and len(unit.children()) == 1 and unit.health() == 200

        # stop leaves nothing behind.
        t = time.monotonic()
        cp = box.systemctl("stop", UNIT)
        r = unit.show("ActiveState", "Result")
        left = box.run("pgrep", "-a", "-u", UNIT).stdout + box.run("pgrep", "-a", "llama").stdout
        procs = box.run("cat", f"/sys/fs/cgroup/system.slice/{SERVICE}/cgroup.procs").stdout
        assert cp.returncode == 0 and r == {"ActiveState": "inactive", "Result": "success"}, (cp.stderr, r)
        assert not left.strip() and not procs.strip(), (left, procs)
        figures["stop"] = f"systemctl stop in {time.monotonic() - t:.2f} s, nothing left"

        # An invalid settings file: exit 2, and systemd does not retry it (RestartPreventExitStatus=2).
        settings = box.root / "etc/llama-supervisor/supervisor.yaml"
        good = settings.read_text()
        settings.write_text(good + "no_such_setting: 1\n")
        cp = box.systemctl("start", UNIT)
        assert cp.returncode != 0
        time.sleep(7)  # longer than RestartSec=5; a manual start counts restarts from 0 again
        r = unit.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert r == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2", "NRestarts": "0"}, r
        figures["config-error"] = f"exit 2 -> {r}, 7 s later"
        assert "no_such_setting: unknown setting" in box.run("journalctl", "-u", UNIT, "--no-pager").stdout
        settings.write_text(good)
        box.systemctl("reset-failed", UNIT)

        warnings = _unit_warnings(unit)
        assert not warnings, warnings
        figures["pid1-warnings"] = f"none about the unit; {len(unit.pid1('warning'))} in all, the provoked ones included"
    # Nothing of the box is left on the host: its PID 1 (and so everything in it), its cgroup, its mounts.
    assert not Path(f"/proc/{box_pid}").exists() and not cgroup.exists()
    figures["total"] = f"{time.monotonic() - t_all:.0f} s"
    print("\n".join(f"{k}: {v}" for k, v in figures.items()))
