#!/usr/bin/env python3
"""Benchmarks: llama-server directly vs through the supervisor, in one run, interleaved.

The "direct" side is the supervisor's own child (its loopback port from /status), so both sides hit the
same llama-server and machine noise hits both alike. Uses the real llama-server and the tiny models,
which generate thousands of tokens per second, so the proxy's own cost is visible.

    .venv/bin/python scripts/bench.py [--quick] [--out bench-results]

Prints a markdown table and writes bench-results/bench.json and bench.md. Targets are printed beside the
figures; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import compileall
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_activity  # noqa: E402
import bench_context  # noqa: E402
import bench_cpu  # noqa: E402
import bench_models  # noqa: E402
import build_llama_server  # noqa: E402
import tiny_gguf  # noqa: E402

CHAT8 = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "ignore_eos": True}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


class Supervisor:
    """`llama-supervisor run` as a subprocess, its JSON log read in a thread."""

    def __init__(self, profile: Path, state: Path, extra_env: dict[str, str] | None = None) -> None:
        # Defaults otherwise (llama-server's lines logged too): the costs measured are what a user pays.
        env = {**os.environ, "LLAMA_SUPERVISOR_STATE_DIR": str(state), **(extra_env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--profile", str(profile), "--port",
                                      "0", "--log-format", "json"], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                     text=True)
        self.events: list[dict[str, Any]] = []
        self.url: str | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(30):
            raise SystemExit("supervisor did not start")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["_t"] = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
            self.events.append(ev)
            if ev.get("event") == "listening":
                self.url = ev["url"]
                self._listening.set()

    def wait_any_state(self, states: tuple[str, ...], after: float, timeout: float = 60) -> dict[str, Any] | None:
        """The first transition into one of `states` logged after `after` (wall clock), or None on timeout."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for ev in list(self.events):
                if ev.get("event") == "state" and ev.get("to") in states and ev["_t"] >= after:
                    return ev
            time.sleep(0.005)
        return None

    def wait_state(self, state: str, after: float, timeout: float = 60) -> float:
        ev = self.wait_any_state((state,), after, timeout)
        if ev is None:
            raise SystemExit(f"no state {state} within {timeout}s")
        return float(ev["_t"])

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/status", timeout=10).json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_profile(path: Path, binary: str, model: Path, mmproj: Path | None = None, **extra: Any) -> Path:
    lines = ["name: bench", f"binary: {binary}", f"model: {model}", "n_gpu_layers: 0",
             "cache_ram_mib: 0"]
    if mmproj:
        lines.append(f"mmproj: {mmproj}")
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- P1: latency -----------------------------------------------------------------------------------


async def p1_latency(through: str, direct: str, n: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"direct": [], "through": []}
    limits = httpx.Limits(max_keepalive_connections=4)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        for base in (direct, through):  # warm both connections
            for _ in range(20):
                await c.post(f"{base}/v1/chat/completions", json=CHAT8)
        for i in range(n):
            order = [("direct", direct), ("through", through)] if i % 2 == 0 else [("through", through),
                                                                                    ("direct", direct)]
            for name, base in order:
                t = time.perf_counter()
                r = await c.post(f"{base}/v1/chat/completions", json=CHAT8)
                times[name].append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
    out: dict[str, Any] = {k: {"p50_ms": round(pct(v, 50), 3), "p99_ms": round(pct(v, 99), 3), "n": len(v)}
                           for k, v in times.items()}
    out["added_p50_ms"] = round(out["through"]["p50_ms"] - out["direct"]["p50_ms"], 3)
    out["added_p99_ms"] = round(out["through"]["p99_ms"] - out["direct"]["p99_ms"], 3)
    return out


# ---- P2: streaming ---------------------------------------------------------------------------------


async def _raw_stream(base: str, body: bytes) -> tuple[float, int]:
    """One streaming request over a raw socket: (time to first token, tokens). A lean client, so the load
    generator takes as little CPU as it can from the two sides being compared."""
    host, port = base.removeprefix("http://").split(":")
    t = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: "
                 b"application/json\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    first, n, tail = None, 0, b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf = tail + chunk
        found = buf.count(b'"content":"')
        if found and first is None:
            first = time.perf_counter() - t
        n += found
        tail = buf[-16:]
        if b"data: [DONE]" in buf:
            break
    writer.close()
    return (first or 0.0) * 1000, n


async def _stream_round(base: str, clients: int, tokens: int) -> tuple[int, float, list[float]]:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True,
                       "ignore_eos": True}).encode()
    t = time.perf_counter()
    got = await asyncio.gather(*(_raw_stream(base, body) for _ in range(clients)))
    return clients * tokens, time.perf_counter() - t, [ttft for ttft, _ in got]


async def p2_streaming(through: str, direct: str, rounds: int, clients: int = 16, tokens: int = 128
                       ) -> dict[str, Any]:
    agg: dict[str, dict[str, Any]] = {k: {"tokens": 0, "seconds": 0.0, "ttft": []} for k in ("direct", "through")}
    await _stream_round(direct, clients, 8)
    await _stream_round(through, clients, 8)
    for i in range(rounds):
        for name, base in ([("direct", direct), ("through", through)] if i % 2 == 0 else
                           [("through", through), ("direct", direct)]):
            n, s, ttft = await _stream_round(base, clients, tokens)
            agg[name]["tokens"] += n
            agg[name]["seconds"] += s
            agg[name]["ttft"] += ttft
    out: dict[str, Any] = {}
    for name, a in agg.items():
        out[name] = {"tokens_per_s": round(a["tokens"] / a["seconds"], 1),
                     "ttft_p50_ms": round(pct(a["ttft"], 50), 2), "ttft_p99_ms": round(pct(a["ttft"], 99), 2)}
    out["ratio"] = round(out["through"]["tokens_per_s"] / out["direct"]["tokens_per_s"], 4)
    out["added_ttft_p50_ms"] = round(out["through"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"], 2)
    out["clients"], out["tokens_each"], out["rounds"] = clients, tokens, rounds
    return out


# ---- P3: cold start --------------------------------------------------------------------------------


def p3_cold_start(binary: str, model: Path, profile: Path, tmp: Path, n: int) -> dict[str, Any]:
    bare, sup_ready, sup_warm, sup_health = [], [], [], []
    for i in range(n):
        port = free_port()
        t = time.perf_counter()
        proc = subprocess.Popen([binary, "--model", str(model), "--port", str(port), "--ctx-size", "4096",
                                 "--n-gpu-layers", "0", "--cache-ram", "0"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.002)
        bare.append(time.perf_counter() - t)
        proc.terminate()
        proc.wait()
        t0 = time.time()
        sup = Supervisor(profile, tmp / f"cold-{i}")
        ready = sup.wait_state("ready", t0)
        warming = sup.wait_state("warming", t0)
        sup_ready.append(ready - t0)
        sup_health.append(warming - t0)
        sup_warm.append(ready - warming)
        sup.stop()
    med = statistics.median
    return {"bare_start_to_health_s": round(med(bare), 3), "supervisor_start_to_ready_s": round(med(sup_ready), 3),
            "supervisor_start_to_child_health_s": round(med(sup_health), 3),
            "warmup_s": round(med(sup_warm), 3),
            "beyond_bare_plus_warmup_s": round(med(sup_ready) - med(bare) - med(sup_warm), 3), "runs": n}


# ---- P4: crash recovery ----------------------------------------------------------------------------


async def p4_recovery(sup: Supervisor) -> dict[str, Any]:
    stop = asyncio.Event()
    results: list[tuple[float, int]] = []

    async def client() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            while not stop.is_set():
                t = time.time()
                try:
                    r = await c.post(f"{sup.url}/v1/chat/completions", json=CHAT8)
                    results.append((t, r.status_code))
                except httpx.HTTPError:
                    results.append((t, 0))

    tasks = [asyncio.ensure_future(client()) for _ in range(4)]
    await asyncio.sleep(1.0)
    pid = sup.status()["child"]["pid"]
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    ready = await asyncio.to_thread(sup.wait_state, "ready", t_kill)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    exit_ev = next(e for e in sup.events if e.get("event") == "child_exit" and e["_t"] >= t_kill)
    failed = [s for t, s in results if s != 200]
    during = [s for t, s in results if t_kill <= t <= ready]
    return {"detection_ms": round((exit_ev["_t"] - t_kill) * 1000, 1), "back_to_ready_s": round(ready - t_kill, 3),
            "requests": len(results), "requests_during_restart": len(during), "failed_requests": len(failed),
            "failed_statuses": sorted(failed)}  # 0: the client saw no HTTP answer at all


# ---- P5: images ------------------------------------------------------------------------------------


async def p5_images(through: str, direct: str, reps: int) -> dict[str, Any]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (4000, 3000), (90, 140, 200))
    d = ImageDraw.Draw(img)
    for i in range(0, 4000, 40):  # some detail, so the JPEG is photo-sized
        d.line((i, 0, 4000 - i, 3000), fill=(i % 255, 80, 160), width=3)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 1}
    out: dict[str, Any] = {"jpeg_bytes": len(buf.getvalue())}
    async with httpx.AsyncClient(timeout=300) as c:
        for name, base in (("direct", direct), ("through", through)):
            times, tokens = [], 0
            for _ in range(reps):
                t = time.perf_counter()
                r = await c.post(f"{base}/v1/chat/completions", json=body)
                times.append(time.perf_counter() - t)
                tokens = r.json()["usage"]["prompt_tokens"]
            out[name] = {"median_s": round(statistics.median(times), 3), "prompt_tokens": tokens}
    return out


def first_image_latency(profile_with: Path, profile_without: Path, tmp: Path) -> dict[str, Any]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1024, 768), (10, 200, 30)).save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 1}
    out = {}
    for name, profile in (("with_image_warmup", profile_with), ("without_warmup", profile_without)):
        vals = []
        for i in range(3):
            t0 = time.time()
            sup = Supervisor(profile, tmp / f"first-{name}-{i}")
            sup.wait_state("ready", t0)
            t = time.perf_counter()
            httpx.post(f"{sup.url}/v1/chat/completions", json=body, timeout=120)
            vals.append(time.perf_counter() - t)
            sup.stop()
        out[name] = {"first_image_request_ms": round(statistics.median(vals) * 1000, 1)}
    return out


# ---- P6: footprint ---------------------------------------------------------------------------------


def sample_cpu(pid: int, seconds: float) -> tuple[float, int]:
    p = psutil.Process(pid)
    c0 = p.cpu_times()
    time.sleep(seconds)
    c1 = p.cpu_times()
    busy = (c1.user - c0.user) + (c1.system - c0.system)
    return round(100 * busy / seconds, 3), p.memory_info().rss


async def p6_under_load(sup: Supervisor, direct: str) -> dict[str, Any]:
    pid = sup.proc.pid
    task = asyncio.ensure_future(p2_streaming(sup.url or "", direct, rounds=4))
    await asyncio.sleep(1.0)
    cpu, rss = await asyncio.to_thread(sample_cpu, pid, 3.0)
    await task
    return {"cpu_percent_of_a_core": cpu, "rss_mb": round(rss / 1e6, 1)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    binary = str(build_llama_server.cached_binary("cpu"))
    # The supervisor as installed: `pip install` (scripts/install-systemd.sh) compiles its bytecode, while this
    # checkout's editable install under PYTHONDONTWRITEBYTECODE would compile every module at every start.
    compileall.compile_dir(str(ROOT / "supervisor"), quiet=1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.only == "models":
        print("P8 several models ...", file=sys.stderr)
        return {"date": datetime.now().isoformat(timespec="seconds"),
                "p8_models": await bench_models.p8_models(binary, tmp, args.quick)}
    model = tiny_gguf.write_tiny_llama(tmp / "tiny.gguf")
    vl_model, mmproj = tiny_gguf.write_tiny_qwen3vl(tmp / "vl.gguf", tmp / "mmproj-vl.gguf")
    text_profile = write_profile(tmp / "text.yaml", binary, model, ctx_size=16 * 160, parallel=16, threads=1)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                               "date": datetime.now().isoformat(timespec="seconds")}
    if args.only == "context":
        results["p7_context_guard"] = p7_context(binary, vl_model, mmproj, tmp, args.quick)
        return results

    if args.only == "cpu":
        results["cpu"] = await cpu_only(binary, text_profile, vl_model, mmproj, tmp, args)
        return results

    print("P3 cold start ...", file=sys.stderr)
    cold_profile = write_profile(tmp / "cold.yaml", binary, model, ctx_size=4096)
    results["p3_cold_start"] = p3_cold_start(binary, model, cold_profile, tmp, 3 if args.quick else 5)

    t0 = time.time()
    sup = Supervisor(text_profile, tmp / "state")
    sup.wait_state("ready", t0)
    direct = sup.status()["child"]["url"]
    try:
        print("P6 idle footprint ...", file=sys.stderr)
        cpu, rss = await asyncio.to_thread(sample_cpu, sup.proc.pid, 10.0 if args.quick else 60.0)
        results["p6_footprint"] = {"idle": {"seconds": 10 if args.quick else 60, "cpu_percent_of_a_core": cpu,
                                            "rss_mb": round(rss / 1e6, 1)}}
        print("P1 latency ...", file=sys.stderr)
        results["p1_latency"] = await p1_latency(sup.url or "", direct, 200 if args.quick else 600)
        print("P2 streaming ...", file=sys.stderr)
        results["p2_streaming"] = await p2_streaming(sup.url or "", direct, 2 if args.quick else 6)
        print("P6 under load ...", file=sys.stderr)
        results["p6_footprint"]["under_p2_load"] = await p6_under_load(sup, direct)
        print("C proxy reference (P1, P2) and CPU per request and per token ...", file=sys.stderr)
        cp = bench_cpu.CProxy(direct, tmp, args.reference)
        try:
            results["c_proxy_reference"] = {
                "name": cp.name, "p1_latency": await p1_latency(cp.url, direct, 200 if args.quick else 600),
                "p2_streaming": await p2_streaming(cp.url, direct, 2 if args.quick else 6)}
            results["cpu"] = {"reference": cp.name, "text": await cpu_text(sup, cp, args.quick)}
        finally:
            cp.stop()
        print("P4 crash recovery ...", file=sys.stderr)
        results["p4_recovery"] = await p4_recovery(sup)
    finally:
        sup.stop()
    print("P1/P2 with the activity log on and off ...", file=sys.stderr)
    results["activity_log"] = await bench_activity.on_and_off(Supervisor, text_profile, tmp, args.quick, p1_latency,
                                                              p2_streaming)

    print("P5 images ...", file=sys.stderr)
    vl_profile = write_profile(tmp / "vl.yaml", binary, vl_model, mmproj, ctx_size=8192, parallel=1)
    t0 = time.time()
    sup = Supervisor(vl_profile, tmp / "state-vl")
    sup.wait_state("ready", t0)
    try:
        results["p5_images"] = await p5_images(sup.url or "", sup.status()["child"]["url"], 2 if args.quick else 3)
        print("CPU per image request and per context-guarded request ...", file=sys.stderr)
        results["cpu"]["vision"] = await cpu_vision(sup, tmp, args.quick, args.reference)
    finally:
        sup.stop()
    no_warm = write_profile(tmp / "vl-nowarm.yaml", binary, vl_model, mmproj, ctx_size=8192, parallel=1,
                            warmup=False)
    results["p5_images"]["first_image"] = first_image_latency(vl_profile, no_warm, tmp)
    results["p7_context_guard"] = p7_context(binary, vl_model, mmproj, tmp, args.quick)

    # The ops page's sampler (every 2 s by default) is on in every run above; this one has it off, to show
    # what it costs at idle.
    print("P6 idle footprint, sampler off ...", file=sys.stderr)
    t0 = time.time()
    sup = Supervisor(text_profile, tmp / "state-nosampler", {"LLAMA_SUPERVISOR_SAMPLE_INTERVAL_S": "0"})
    sup.wait_state("ready", t0)
    try:
        seconds = 10.0 if args.quick else 60.0
        cpu, rss = await asyncio.to_thread(sample_cpu, sup.proc.pid, seconds)
        results["p6_footprint"]["idle_sampler_off"] = {"seconds": seconds, "cpu_percent_of_a_core": cpu,
                                                      "rss_mb": round(rss / 1e6, 1)}
    finally:
        sup.stop()
    print("P8 several models ...", file=sys.stderr)
    results["p8_models"] = await bench_models.p8_models(binary, tmp, args.quick)
    return results


async def cpu_text(sup: Supervisor, cp: bench_cpu.CProxy, quick: bool) -> dict[str, Any]:
    """CPU per request (8-token chats) and per streamed token: the supervisor and the C proxy, same llama-server."""
    return await bench_cpu.text_phases({"supervisor": (sup.url or "", [sup.proc.pid]), cp.name: (cp.url, cp.pids())},
                                       150 if quick else 600, 2 if quick else 4)


async def cpu_vision(sup: Supervisor, tmp: Path, quick: bool, reference: str) -> dict[str, Any]:
    """CPU per image request and per context-guarded request, on a supervisor with a projector."""
    cp = bench_cpu.CProxy(sup.status()["child"]["url"], tmp, reference)
    try:
        return await bench_cpu.vision_phases({"supervisor": (sup.url or "", [sup.proc.pid]),
                                              cp.name: (cp.url, cp.pids())}, 60 if quick else 300)
    finally:
        cp.stop()


async def cpu_only(binary: str, text_profile: Path, vl_model: Path, mmproj: Path, tmp: Path,
                   args: argparse.Namespace) -> dict[str, Any]:
    """`--only cpu`: the CPU phases alone, on the text and the vision supervisor of a full run."""
    print("CPU per request and per token ...", file=sys.stderr)
    out: dict[str, Any] = {}
    vl_profile = write_profile(tmp / "vl.yaml", binary, vl_model, mmproj, ctx_size=8192, parallel=1)
    for name, profile in (("text", text_profile), ("vision", vl_profile)):
        t0 = time.time()
        sup = Supervisor(profile, tmp / f"state-cpu-{name}")
        sup.wait_state("ready", t0)
        try:
            if name == "vision":
                out[name] = await cpu_vision(sup, tmp, args.quick, args.reference)
                continue
            cp = bench_cpu.CProxy(sup.status()["child"]["url"], tmp, args.reference)
            out["reference"] = cp.name
            try:
                out[name] = await cpu_text(sup, cp, args.quick)
            finally:
                cp.stop()
        finally:
            sup.stop()
    return out


def p7_context(binary: str, vl_model: Path, mmproj: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """The context guard's cost: two supervisors on the vision pair, guard on and off (bench_context.py)."""
    print("P7 context guard ...", file=sys.stderr)
    sups = []
    try:
        for name, fit in (("on", True), ("off", False)):
            profile = write_profile(tmp / f"ctx-{name}.yaml", binary, vl_model, mmproj, ctx_size=4096, parallel=1,
                                    threads=1, images={"fit_context": fit})
            t0 = time.time()
            sups.append(Supervisor(profile, tmp / f"state-ctx-{name}"))
            sups[-1].wait_state("ready", t0)
        on, off = sups
        st = on.status()
        return bench_context.p7_context_guard(on.url or "", off.url or "", st["child"]["url"],
                                              st["context"]["n_ctx_per_slot"], 50 if quick else 200)
    finally:
        for sup in sups:
            sup.stop()


def cpu_table(r: dict[str, Any]) -> str:
    """The CPU costs: the supervisor's beside the C proxy's, in a table of their own."""
    name = r["cpu"].get("reference", "C proxy")
    lines = [f"| CPU time (user + system, all threads) | the supervisor | {name} (reference) | target |",
             "|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in bench_cpu.rows(r["cpu"])])


def table(r: dict[str, Any]) -> str:
    cpu = "\n\n" + cpu_table(r) if "cpu" in r else ""
    if set(r) <= {"machine", "date", "cpu"}:  # --only cpu
        return cpu.strip()
    return main_table(r) + cpu


def main_table(r: dict[str, Any]) -> str:
    head = ["| measure | direct llama-server | through the supervisor | difference | target |", "|---|---|---|---|---|"]
    guard = bench_context.rows(r["p7_context_guard"]) if "p7_context_guard" in r else []
    models = bench_models.rows(r["p8_models"]) if "p8_models" in r else []
    activity = bench_activity.rows(r["activity_log"]) if "activity_log" in r else []
    if "p1_latency" not in r:  # --only context / models
        return "\n".join(head + [f"| {' | '.join(row)} |" for row in guard + models])
    p1, p2, p3, p4, p5, p6 = (r["p1_latency"], r["p2_streaming"], r["p3_cold_start"], r["p4_recovery"],
                              r["p5_images"], r["p6_footprint"])
    rows = [
        ("P1 chat, 8 tokens, 1 client: p50", f"{p1['direct']['p50_ms']} ms", f"{p1['through']['p50_ms']} ms",
         f"+{p1['added_p50_ms']} ms", "≤ +1 ms"),
        ("P1 p99", f"{p1['direct']['p99_ms']} ms", f"{p1['through']['p99_ms']} ms", f"+{p1['added_p99_ms']} ms",
         "≤ +3 ms"),
        (f"P2 stream, {p2['clients']}×{p2['tokens_each']} tokens: throughput", f"{p2['direct']['tokens_per_s']} tok/s",
         f"{p2['through']['tokens_per_s']} tok/s", f"{p2['ratio'] * 100:.1f} %", "≥ 97 %"),
        ("P2 time to first token p50", f"{p2['direct']['ttft_p50_ms']} ms", f"{p2['through']['ttft_p50_ms']} ms",
         f"+{p2['added_ttft_p50_ms']} ms", "≤ +2 ms"),
        ("P2 time to first token p99", f"{p2['direct']['ttft_p99_ms']} ms", f"{p2['through']['ttft_p99_ms']} ms",
         f"+{round(p2['through']['ttft_p99_ms'] - p2['direct']['ttft_p99_ms'], 2)} ms", ""),
        ("P3 cold start → ready", f"{p3['bare_start_to_health_s']} s (to /health)",
         f"{p3['supervisor_start_to_ready_s']} s (warmup {p3['warmup_s']} s)",
         f"+{p3['beyond_bare_plus_warmup_s']} s beyond bare + warmup", "≤ +0.15 s"),
        ("P4 SIGKILL under load: detection", "", f"{p4['detection_ms']} ms", "", "≤ 50 ms"),
        ("P4 back to ready", f"{p3['bare_start_to_health_s']} s (bare cold start)", f"{p4['back_to_ready_s']} s", "",
         "≤ bare + 0.3 s"),
        ("P4 failed requests", "", f"{p4['failed_requests']} of {p4['requests']} "
         f"({p4['requests_during_restart']} sent during the restart)", "", "0"),
        ("P5 4000×3000 JPEG, end to end", f"{p5['direct']['median_s']} s, {p5['direct']['prompt_tokens']} tokens",
         f"{p5['through']['median_s']} s, {p5['through']['prompt_tokens']} tokens", "", ""),
        ("P5 first image after ready", f"{p5['first_image']['without_warmup']['first_image_request_ms']} ms "
         "(no warmup)", f"{p5['first_image']['with_image_warmup']['first_image_request_ms']} ms (image warmup)", "", ""),
        (f"P6 supervisor idle, ops page sampler on ({p6['idle']['seconds']} s)", "", f"{p6['idle']['rss_mb']} MB RSS, "
         f"{p6['idle']['cpu_percent_of_a_core']} % CPU", "", "≤ 60 MB, ≤ 0.5 %"),
        (f"P6 supervisor idle, ops page sampler off ({p6['idle_sampler_off']['seconds']:.0f} s)", "",
         f"{p6['idle_sampler_off']['rss_mb']} MB RSS, {p6['idle_sampler_off']['cpu_percent_of_a_core']} % CPU",
         "", ""),
        ("P6 supervisor under P2 load", "", f"{p6['under_p2_load']['rss_mb']} MB RSS, "
         f"{p6['under_p2_load']['cpu_percent_of_a_core']} % CPU", "", ""),
    ]
    ref = r.get("c_proxy_reference")
    if ref:
        n1, n2, name = ref["p1_latency"], ref["p2_streaming"], ref["name"]
        rows += [
            (f"reference: {name}, P1 p50 / p99", f"{n1['direct']['p50_ms']} / {n1['direct']['p99_ms']} ms",
             f"{n1['through']['p50_ms']} / {n1['through']['p99_ms']} ms ({name})",
             f"+{n1['added_p50_ms']} / +{n1['added_p99_ms']} ms", ""),
            (f"reference: {name}, P2 throughput / TTFT p50", f"{n2['direct']['tokens_per_s']} tok/s / "
             f"{n2['direct']['ttft_p50_ms']} ms", f"{n2['through']['tokens_per_s']} tok/s / "
             f"{n2['through']['ttft_p50_ms']} ms ({name})", f"{n2['ratio'] * 100:.1f} % / "
             f"+{n2['added_ttft_p50_ms']} ms", ""),
        ]
    rows += activity + guard + models
    out = head + [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not for the README)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--only", choices=["all", "context", "models", "cpu"], default="all",
                    help="context: only P7, the context guard's cost (two supervisors on the vision pair); "
                         "models: only P8, several models (swap cost, alternating clients); "
                         "cpu: only the CPU per request and per token, beside a C proxy's (bench_cpu.py)")
    ap.add_argument("--reference", choices=["haproxy", "nginx"], default="haproxy",
                    help="the C proxy put in front of the same llama-server as the reference (default: HAProxy, "
                         "which scripts/setup.sh installs; nginx only if installed)")
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    (args.out / "bench.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
