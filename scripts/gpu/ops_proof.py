#!/usr/bin/env python3
"""What the ops page and the HAProxy agent show on a real NVIDIA GPU, with two models on it.

Runs on the lent GPU machine (see run.sh ops): builds llama-server with CUDA from the source bundle, writes two
random f16 models (4 layers of ~416 MiB each), runs the supervisor on a profiles folder holding both (all
layers on the GPU, sampler at 1 s, agent on), loads the second from the admin route, sends requests to both,
unloads one, and reads what the page reads:
  - /ui/api/overview: the GPUs (NVML), each model's llama-server VRAM, both cards (one unloaded at the end);
  - /ui/api/samples: the per-GPU series (VRAM used, utilisation) with values, and per-model tokens/s;
  - /ui/api/events: the swaps (load with its cause, drain, unload);
  - the agent's answers before and after the default is unloaded.
Each check is printed and written to ops.json / ops.md under --out; the script exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

import proof  # noqa: E402  (build, write_big_model)

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[ops {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def agent_says(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.makefile().readline().strip()


def until(what: str, check: Any, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def run(folder: Path, state: Path) -> dict[str, Any]:
    import httpx
    from bench import Supervisor, free_port

    agent_port = free_port()
    sup = Supervisor(folder / "a.yaml", state, {"LLAMA_SUPERVISOR_PROFILES_DIR": str(folder),
                                                "LLAMA_SUPERVISOR_SAMPLE_INTERVAL_S": "1",
                                                "LLAMA_SUPERVISOR_AGENT_PORT": str(agent_port),
                                                "LLAMA_SUPERVISOR_QUEUE_WAIT_S": "300"})
    out: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=sup.url or "", timeout=300) as c:
            def card(name: str) -> dict[str, Any]:
                return next(m for m in c.get("/ui/api/overview").json()["models"] if m["profile"]["name"] == name)

            until("a ready", lambda: card("a")["state"] == "ready")
            out["agent_a_ready"] = agent_says(agent_port)
            assert c.post("/admin/models/b/load").status_code == 202
            until("b ready", lambda: card("b")["state"] == "ready")
            for i in range(6):
                r = c.post("/v1/completions", json={"model": "ab"[i % 2], "prompt": "hello", "max_tokens": 32,
                                                     "temperature": 0, "ignore_eos": True})
                out.setdefault("answers", []).append(r.status_code)
            time.sleep(3)  # a few samples after the requests
            ov = c.get("/ui/api/overview").json()
            out["gpus"] = [{k: g.get(k) for k in ("index", "name", "memory_total_mib", "memory_used_mib",
                                                   "utilization_pct")} for g in ov["gpus"]]
            out["child_vram_mib"] = {m["profile"]["name"]: (m["child"] or {}).get("vram_mib") for m in ov["models"]}
            out["measured_gpu_mib"] = {m["profile"]["name"]: m["residency"]["memory"]["measured"]
                                       for m in ov["models"]}
            samples = c.get("/ui/api/samples?window=300").json()
            series = samples["series"]
            out["gpu_series"] = {k: [v for v in vs if v is not None][-5:] for k, vs in series.items()
                                 if k.startswith("gpu_")}
            out["tokens_series"] = {k: max((v for v in vs if v is not None), default=None)
                                    for k, vs in series.items() if k.startswith("completion_tps@")}
            assert c.post("/admin/models/a/unload").status_code == 202
            until("a unloaded", lambda: card("a")["state"] == "unloaded")
            out["agent_a_unloaded"] = agent_says(agent_port)
            out["card_a_unloaded"] = {k: card("a")[k] for k in ("state", "reason")}
            out["swaps"] = [f"{e['model']} {e['title']}" for e in c.get("/ui/api/events").json()["events"]
                            if e["kind"] == "swap"]
    finally:
        sup.stop()
    return out


def checks(r: dict[str, Any]) -> list[tuple[str, bool]]:
    gpu_mem = [v for k, vs in r["gpu_series"].items() if k.startswith("gpu_mem_mb@") for v in vs]
    return [
        ("NVML sees the GPU on the page", bool(r["gpus"]) and bool(r["gpus"][0].get("name"))),
        ("each model's llama-server holds VRAM (overview)", all((v or 0) > 500 for v in r["child_vram_mib"].values())),
        ("VRAM chart series has values", bool(gpu_mem) and max(gpu_mem) > 1000),
        ("GPU utilisation series present", any(k.startswith("gpu_util@") for k in r["gpu_series"])),
        ("tokens/s per model", all((v or 0) > 0 for v in r["tokens_series"].values()) and len(r["tokens_series"]) == 2),
        ("all requests answered", r["answers"] == [200] * 6),
        ("swaps on the timeline", any("b load: admin" in s for s in r["swaps"])
         and any("a unload: admin" in s for s in r["swaps"])),
        ("agent ready while the default serves", r["agent_a_ready"].startswith("ready")),
        ("agent maint once the default is unloaded", r["agent_a_unloaded"] == "maint #unloaded"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ops"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["LLAMA_SUPERVISOR_CACHE"] = str(args.work / "cache")
    log("building llama-server with CUDA")
    binary = proof.build(args.source, args.jobs)
    folder = args.work / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        model = proof.write_big_model(args.work / f"{name}-f16.gguf", layers=4)
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nbinary: {binary}\nmodel: {model}\nn_gpu_layers: all\nctx_size: 2048\n"
            "min_ctx_size: 1024\ncache_ram_mib: 0\nparallel: 1\n")
    result = run(folder, args.work / "state")
    verdict = checks(result)
    result["checks"] = dict(verdict)
    (args.out / "ops.json").write_text(json.dumps(result, indent=2))
    lines = ["| check | result |", "|---|---|"] + [f"| {n} | {'PASS' if ok else 'FAIL'} |" for n, ok in verdict]
    lines += ["", f"GPUs: {result['gpus']}", f"llama-server VRAM (MiB): {result['child_vram_mib']}",
              f"GPU series (last values): {result['gpu_series']}", f"agent: {result['agent_a_ready']!r} → "
              f"{result['agent_a_unloaded']!r}", f"swaps: {result['swaps']}"]
    md = "\n".join(lines)
    (args.out / "ops.md").write_text(md + "\n")
    print(md, flush=True)
    sys.exit(0 if all(ok for _, ok in verdict) else 1)


if __name__ == "__main__":
    main()
