"""Helpers for the fleet test: supervisors as real processes, the shipped HAProxy config, and its state."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
CLI = [sys.executable, "-m", "supervisor"]
# HAProxy's `show servers state`: srv_op_state 2 is running; srv_admin_state 0 is READY (1: MAINT from the
# agent or CLI, 8: DRAIN from the agent).
OP_RUNNING, ADMIN_READY = 2, 0


def haproxy_binary() -> str:
    """Debian's haproxy. Missing is a failure, never a skip: the fleet test must run for real in CI."""
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail("haproxy not found: run scripts/setup.sh as root (it installs Debian's haproxy package)")
    return found


@dataclass
class Box:
    """One llama-supervisor process; `url`, `port` and `agent_port` stay the same across restarts."""

    name: str
    profile: Path
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    port: int = 0
    agent_port: int = 0
    log: list[str] = field(default_factory=list)
    child_pids: set[int] = field(default_factory=set)

    def start(self) -> None:
        env = {**self.env, "LLAMA_SUPERVISOR_AGENT_PORT": str(self.agent_port)}
        self.proc = subprocess.Popen([*CLI, "run", "--profile", str(self.profile), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-format", "json"],
                                     stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in self.proc.stderr:
            self.log.append(line)
            if '"listening"' in line:
                self.url = json.loads(line)["url"]
                self.port = int(self.url.rsplit(":", 1)[1])
            if '"agent_listening"' in line:
                self.agent_port = int(json.loads(line)["port"])
                break
            if time.monotonic() > deadline:
                break
        if not (self.url and self.agent_port):
            raise AssertionError(f"{self.name} did not start:\n" + "".join(self.log[-30:]))
        # Keep reading stderr so the daemon never blocks on a full pipe (and the log is there on failure).
        threading.Thread(target=self._drain_log, args=(self.proc,), daemon=True).start()

    def _drain_log(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log.append(line)

    async def status(self, client: httpx.AsyncClient) -> dict:
        r = await client.get(f"{self.url}/status", timeout=5)
        st = r.json()
        if st.get("child"):
            self.child_pids.add(int(st["child"]["pid"]))
        return st

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


def haproxy_config(template: str, bind_fd: int, boxes: list[Box], stats_socket: Path) -> str:
    """The shipped config with only the addresses replaced; every replacement must match exactly once,
    so a change to the shipped file that the test does not follow fails here instead of going untested."""
    subs: list[tuple[str, str]] = [(r"(?m)^(\s*bind) :8080$", rf"\1 fd@{bind_fd}"),
                                   (r"/run/haproxy/admin\.sock", str(stats_socket))]
    for i, box in enumerate(boxes, 1):
        subs.append((rf"(?m)^(\s*server box{i}) box{i}\.example:8080 (check) agent-port 8081$",
                     rf"\1 127.0.0.1:{box.port} \2 agent-port {box.agent_port}"))
    out = template
    for pattern, repl in subs:
        out, n = re.subn(pattern, repl, out)
        assert n == 1, f"deploy/haproxy/haproxy.cfg: expected one match of {pattern!r}, found {n}"
    return out


class HAProxy:
    def __init__(self, binary: str, workdir: Path, boxes: list[Box]) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))  # HAProxy refuses port 0; it inherits this socket instead
        self.listener.listen(512)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stats = workdir / "admin.sock"
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(haproxy_config(HAPROXY_CFG.read_text(), self.listener.fileno(), boxes, self.stats))
        check = subprocess.run([binary, "-c", "-f", str(self.cfg)], check=False, capture_output=True, text=True,
                               pass_fds=[self.listener.fileno()])
        assert check.returncode == 0, check.stdout + check.stderr
        self.log: list[str] = []
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.cfg)], pass_fds=[self.listener.fileno()],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._drain_log, daemon=True).start()

    def _drain_log(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    async def servers(self) -> dict[str, tuple[int, int, int]]:
        """box name → (op state, admin state, current weight), from the stats socket."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.stats))
        except OSError:
            assert self.proc.poll() is None, "HAProxy exited:\n" + "".join(self.log)
            return {}  # still starting
        try:
            writer.write(b"show servers state llama_boxes\n")
            await writer.drain()
            text = (await reader.read()).decode()
        finally:
            writer.close()
        out = {}
        for line in text.splitlines():
            f = line.split()
            if len(f) > 8 and f[1] == "llama_boxes":
                out[f[3]] = (int(f[5]), int(f[6]), int(f[7]))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # soft stop: finish what is in flight
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.listener.close()


# ---- clients under load, and the end of a fleet test --------------------------------------------------------

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


@dataclass
class Result:
    box: str
    sent: float  # monotonic time the request was sent
    status: int
    stream: bool
    complete: bool
    detail: str = ""


async def one_request(client: httpx.AsyncClient, url: str, stream: bool) -> Result:
    body = {"messages": PROMPT, "max_tokens": random.randint(8, 40), "stream": stream}
    t0 = time.monotonic()
    try:
        if not stream:
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            return Result(r.headers.get("x-llama-box", "?"), t0, r.status_code, False, ok, r.text[:200])
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            done = finished = False
            error = ""
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = line[:200]
                    elif chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                        finished = True
                elif line.startswith("event: error"):
                    error = line
            return Result(r.headers.get("x-llama-box", "?"), t0, r.status_code, True,
                          r.status_code == 200 and done and finished and not error, error)
    except httpx.HTTPError as exc:
        return Result("?", t0, 0, stream, False, repr(exc))


async def load_client(url: str, stream: bool, stop: asyncio.Event, results: list[Result]) -> None:
    """One client through `url` until `stop`: a request, a short pause, the next."""
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            results.append(await one_request(client, url, stream))
            await asyncio.sleep(random.uniform(0.03, 0.1))  # steady, and light enough to share a 2-core machine


async def stop_fleet(stop: asyncio.Event, load: list[asyncio.Task[None]], boxes: list[Box], haproxy: HAProxy | None
                     ) -> None:
    """The clients stop, every supervisor gets SIGTERM (killed if it does not exit in 30 s), then HAProxy."""
    stop.set()
    for task in load:
        task.cancel()
    await asyncio.gather(*load, return_exceptions=True)
    for b in boxes:
        if b.proc is not None and b.proc.poll() is None:
            b.signal(signal.SIGTERM)
    for b in boxes:
        if b.proc is not None:
            try:
                await asyncio.to_thread(b.proc.wait, 30)
            except subprocess.TimeoutExpired:
                b.proc.kill()
    if haproxy is not None:
        haproxy.stop()
