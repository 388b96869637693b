"""A stand-in for a llama-server with a crash-on-input bug (llama.cpp has had many: an assert on an odd prompt
or image), which this machine's llama-server does not have.

It takes llama-server's arguments and runs the real llama-server on another port, in front of which it
forwards every request; a request whose body contains the poison text makes it abort (SIGABRT), as an
assert does. --help, --version and --list-devices go straight to the real binary.

`write_poison_double(path, real, poison)` writes an executable copy configured for one test.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def forward(real: str, args: list[str], on_body: Callable[[str, bytes], None]) -> None:
    """Run the real llama-server on another port and forward every request to it from the port in `args`;
    `on_body(path, body)` sees each request first (it may end the process). Returns when the real one exits."""
    port = int(args[args.index("--port") + 1])
    inner = _free_port()
    inner_args = list(args)
    inner_args[args.index("--port") + 1] = str(inner)
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    # The real server dies with this process (the supervisor stops the whole group anyway). No thread runs yet.
    proc = subprocess.Popen([real, *inner_args], preexec_fn=lambda: prctl(1, signal.SIGKILL, 0, 0, 0))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            on_body(self.path, body)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", inner, timeout=600)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status, out_headers = resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
                conn.close()
            except OSError:
                status, out_headers = 503, [("Content-Type", "application/json")]
                data = b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'
            self.send_response(status)
            for k, v in out_headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _forward  # http.server's naming

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"forwarding double on {port}, real llama-server on {inner}", file=sys.stderr, flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while proc.poll() is None:
        time.sleep(0.1)
    sys.exit(proc.returncode)


def main(real: str, poison: str) -> None:
    args = sys.argv[1:]
    if args[:1] and args[0] in ("--help", "--version", "--list-devices"):
        os.execv(real, [real, *args])
    marker = poison.encode()

    def check(_path: str, body: bytes) -> None:
        if marker in body:
            print("GGML_ASSERT(poisoned input) failed", file=sys.stderr, flush=True)
            os.abort()

    forward(real, args, check)


def write_poison_double(path: Path, real: str, poison: str) -> Path:
    from doubles.launcher import write_launcher  # the test side only: the double itself never needs it

    return write_launcher(path, "poison_llama_server", f"main({real!r}, {poison!r})")
