#!/usr/bin/env python3
"""Rolling upgrade of llama-server across llama-supervisor boxes behind HAProxy, one box at a time.

For each box, in the order given:
  1. drain: the box's agent check says `drain` and its /health 503 (POST /admin/drain), so HAProxy stops sending
     new work there; wait until HAProxy shows it out (with --haproxy-socket) or --notice-s, then until the box
     has no request in flight (bounded by --drain-s);
  2. canary: POST /admin/upgrade with the new build's path (installed on every box beforehand, e.g. beside the
     old one); the box tries it beside (or instead of) its running build, compares, and switches or stays;
  3. back in the pool: the drain ends (DELETE /admin/drain); wait until the box is ready and HAProxy shows it
     serving again.
The first box whose canary fails stops the run: that box keeps serving on its last good build, and the
boxes after it are not touched. Exit codes: 0 every box upgraded (or already on the build); 1 a canary failed
or a box did not come back; 2 bad arguments; 3 a box could not be reached.

Python's standard library only: it runs from any machine that reaches the boxes' admin ports.

  deploy/rolling-upgrade.py --binary /opt/llama/b5000/llama-server \\
      --haproxy-socket /run/haproxy/admin.sock http://box1:8080 http://box2:8080 http://box3:8080
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3
DRAIN_REASON = "rolling upgrade"


class Unreachable(Exception):
    pass


class Box:
    def __init__(self, url: str, key: str | None, timeout_s: float) -> None:
        self.url, self.key, self.timeout_s = url.rstrip("/"), key, timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout_s: float | None = None) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError) as exc:
            raise Unreachable(f"{self.url}{path}: {exc}") from exc


def haproxy_servers(sock_path: str, backend: str) -> dict[str, tuple[int, int]]:
    """server address:port → (operational state, administrative state) from HAProxy's `show servers state`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(f"show servers state {backend}\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    out = {}
    for line in b"".join(chunks).decode().splitlines():
        f = line.split()
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ... srv_port is field 18
        if len(f) > 18 and f[1] == backend:
            out[f"{f[4]}:{f[18]}"] = (int(f[5]), int(f[6]))
    return out


def _host_port(url: str) -> str:
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    try:
        host = socket.gethostbyname(host.strip("[]"))
    except OSError:
        pass
    return f"{host}:{port or '80'}"


def wait(what: str, check: Any, timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every_s)
    print(f"  gave up after {timeout_s:.0f}s waiting for {what}", flush=True)
    return False


def table(result: dict[str, Any]) -> str:
    rows = (result.get("verdict") or {}).get("rows") or []
    if not rows:
        return "  (no comparison)"
    w = max(len(r["check"]) for r in rows)
    lines = [f"  {'check':<{w}}  {'old':>16}  {'new':>16}  ok"]
    for r in rows:
        lines.append(f"  {r['check']:<{w}}  {str(r['old'])[:16]:>16}  {str(r['new'])[:16]:>16}  "
                     f"{'yes' if r['ok'] else 'NO: ' + r['reason']}")
    return "\n".join(lines)


class Rollout:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        key = args.admin_key or os.environ.get("LLAMA_SUPERVISOR_ADMIN_KEY")
        self.boxes = [Box(u, key, args.request_timeout_s) for u in args.boxes]

    def _haproxy(self, box: Box) -> tuple[int, int] | None:
        if not self.args.haproxy_socket:
            return None
        try:
            return haproxy_servers(self.args.haproxy_socket, self.args.backend).get(_host_port(box.url))
        except OSError:
            return None

    def _in_flight(self, box: Box) -> int:
        _, st = box.call("GET", "/status")
        return int(((st.get("requests") or {}).get("in_flight")) or 0)

    def _ready(self, box: Box) -> bool:
        code, st = box.call("GET", "/status")
        models = st.get("models")
        if isinstance(models, list) and self.args.model:
            st = next((m for m in models if m.get("id") == self.args.model), st)
        return code == 200 and st.get("state") == "ready"

    def leave(self, box: Box) -> None:
        code, body = box.call("POST", "/admin/drain", {"reason": DRAIN_REASON})
        if code >= 400:
            raise Unreachable(f"{box.url}/admin/drain answered {code}: {body}")
        if self.args.haproxy_socket:
            # HAProxy's DRAIN (8) from the agent, or down from the health check (op state != 2).
            wait("HAProxy to take the box out",
                 lambda: (s := self._haproxy(box)) is not None and (s[1] & 8 or s[0] != 2), self.args.notice_s * 5)
        else:
            time.sleep(self.args.notice_s)
        wait("the requests in flight to finish", lambda: self._in_flight(box) == 0, self.args.drain_s)

    def rejoin(self, box: Box) -> bool:
        box.call("DELETE", "/admin/drain", {"reason": DRAIN_REASON})
        ok = wait("the box to be ready", lambda: self._ready(box), self.args.ready_s)
        if ok and self.args.haproxy_socket:
            ok = wait("HAProxy to put the box back", lambda: self._haproxy(box) == (2, 0), self.args.ready_s)
        return ok

    def upgrade(self, box: Box) -> dict[str, Any]:
        body: dict[str, Any] = {"binary": self.args.binary, "dry_run": self.args.dry_run}
        if self.args.model:
            body["model"] = self.args.model
        code, result = box.call("POST", "/admin/upgrade", body, timeout_s=self.args.canary_timeout_s)
        if code >= 400 and "verdict" not in result:
            result.setdefault("passed", False)
            result.setdefault("reasons", [f"/admin/upgrade answered {code}: {json.dumps(result)[:300]}"])
        return result

    def run(self) -> int:
        for i, box in enumerate(self.boxes, 1):
            print(f"[{i}/{len(self.boxes)}] {box.url}: draining", flush=True)
            try:
                self.leave(box)
                print(f"[{i}/{len(self.boxes)}] {box.url}: canary of {self.args.binary}", flush=True)
                result = self.upgrade(box)
                print(table(result), flush=True)
                back = self.rejoin(box)
            except Unreachable as exc:
                print(f"[{i}/{len(self.boxes)}] {box.url}: unreachable: {exc}; stopping here", flush=True)
                return EXIT_UNREACHABLE
            if not result.get("passed"):
                why = "; ".join(result.get("reasons") or ["no reason given"])
                print(f"[{i}/{len(self.boxes)}] {box.url}: canary FAILED ({why}); the box keeps its last good build. "
                      f"Stopping: {len(self.boxes) - i} box(es) not touched.", flush=True)
                return EXIT_FAILED
            what = "switched" if result.get("switched") else "dry run: not switched" if self.args.dry_run else \
                result.get("note") or "not switched"
            print(f"[{i}/{len(self.boxes)}] {box.url}: passed, {what}", flush=True)
            if not back:
                print(f"[{i}/{len(self.boxes)}] {box.url}: not back in the pool; stopping here", flush=True)
                return EXIT_FAILED
        print(f"all {len(self.boxes)} box(es) done", flush=True)
        return EXIT_OK


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("boxes", nargs="+", help="supervisor URLs (http://box1:8080), upgraded in this order")
    p.add_argument("--binary", required=True, help="the new llama-server's path (the same on every box)")
    p.add_argument("--model", help="the model (profile) to upgrade on boxes with several; default: the default")
    p.add_argument("--dry-run", action="store_true", help="run every canary, switch nothing")
    p.add_argument("--admin-key", help="admin key (default: LLAMA_SUPERVISOR_ADMIN_KEY)")
    p.add_argument("--haproxy-socket", help="HAProxy's stats socket, to see each box leave and rejoin the pool")
    p.add_argument("--backend", default="llama_boxes", help="the HAProxy backend (default llama_boxes)")
    p.add_argument("--notice-s", type=float, default=3.0,
                   help="without a socket: how long HAProxy needs to see the drain (> agent-inter; default 3)")
    p.add_argument("--drain-s", type=float, default=120.0, help="longest wait for requests in flight (default 120)")
    p.add_argument("--ready-s", type=float, default=300.0, help="longest wait for a box to come back (default 300)")
    p.add_argument("--canary-timeout-s", type=float, default=1800.0, help="longest canary (default 1800)")
    p.add_argument("--request-timeout-s", type=float, default=10.0, help="other admin calls (default 10)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except SystemExit as exc:
        return EXIT_INVALID if exc.code else EXIT_OK
    return Rollout(args).run()


if __name__ == "__main__":
    sys.exit(main())
