#!/usr/bin/env python3
"""Several models on one real NVIDIA GPU: residency by measured VRAM, swaps without out-of-memory exits.

Runs on the lent GPU machine (see run.sh multimodel): builds llama-server with CUDA from the source bundle,
writes two ~3.3 GiB random f16 models (8 layers of ~416 MiB), holds all but --leave-gib of VRAM with
another process (PyTorch), then runs the supervisor on a profiles folder holding both (all layers on the GPU):
  1. they do not fit together: requests alternate A, B, A, B, ... — every one must be answered, no child may
     exit out of memory, and each swap's cost is measured (request → answer, and unload → loaded);
  2. more VRAM left free (--leave-both-gib), so both fit: the same alternation loads each once, no unload.
Prints a markdown table and writes multimodel.json / multimodel.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

import proof  # noqa: E402  (build, write_big_model, hold_vram)

T0 = time.monotonic()
PROMPT = {"prompt": "hello", "max_tokens": 8, "temperature": 0}


def log(msg: str) -> None:
    print(f"[multimodel {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def write_profiles(folder: Path, binary: str, models: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nbinary: {binary}\nmodel: {model}\nn_gpu_layers: all\nctx_size: 4096\n"
            "min_ctx_size: 1024\ncache_ram_mib: 0\nparallel: 1\n")
    return folder


def alternate(folder: Path, state: Path, rounds: int) -> dict[str, Any]:
    """The supervisor on `folder` (default: a); requests a, b, a, b, ...; what each cost, and what happened."""
    import httpx
    from bench import Supervisor

    t0 = time.time()
    sup = Supervisor(folder / "a.yaml", state, {"LLAMA_SUPERVISOR_PROFILES_DIR": str(folder),
                                                "LLAMA_SUPERVISOR_QUEUE_WAIT_S": "300",
                                                "LLAMA_SUPERVISOR_SWAP_PASS_OVER_S": "1"})
    requests: list[dict[str, Any]] = []
    try:
        if sup.wait_any_state(("ready", "failed"), t0, 300) is None:
            raise SystemExit("the default model never became ready")
        with httpx.Client(base_url=sup.url or "", timeout=300) as c:
            for i in range(rounds * 2):
                model = "ab"[i % 2]
                before = c.get("/status").json()["models"]
                t = time.monotonic()
                r = c.post("/v1/completions", json={**PROMPT, "model": model})
                seconds = time.monotonic() - t
                after = c.get("/status").json()["models"]
                swapped = after[model]["loads"] > before[model]["loads"]
                requests.append({"model": model, "status": r.status_code, "seconds": round(seconds, 3),
                                 "swap": swapped, "vram_mib": after[model]["memory"]["measured"],
                                 "other_state": after["ba"[i % 2]]["state"]})
                log(f"request {i}: {requests[-1]}")
            status = c.get("/status").json()
    finally:
        sup.stop()
    exits = [e for e in sup.events if e.get("event") == "child_exit" and e.get("cause") != "stopped"]
    loads = [e for e in sup.events if e.get("event") == "model_load"]
    unloads = [e for e in sup.events if e.get("event") == "model_unload" and e.get("reason") != "shutdown"]
    # A swap, end to end: the unload that made room → the loaded model's next `ready`.
    swap_s = []
    for u in unloads:
        ready = next((e for e in sup.events if e.get("event") == "state" and e.get("to") == "ready"
                      and e["_t"] > u["_t"]), None)
        if ready is not None:
            swap_s.append(round(ready["_t"] - u["_t"], 3))
    warm = [r["seconds"] for r in requests if not r["swap"]]
    swapped = [r["seconds"] for r in requests if r["swap"]]
    return {
        "requests": requests, "answered": sum(r["status"] == 200 for r in requests), "sent": len(requests),
        "oom_exits": [e.get("cause") for e in exits if str(e.get("cause", "")).startswith("oom")],
        "other_exits": [e.get("cause") for e in exits if not str(e.get("cause", "")).startswith("oom")],
        "loads": len(loads), "unloads": [u.get("reason") for u in unloads], "swap_unload_to_ready_s": swap_s,
        "request_with_swap_s": swapped, "request_without_swap_s": warm,
        "residency": status.get("residency"),
        "layers": {m: (status["models"][m]["settings"]["effective"] or {}).get("n_gpu_layers")
                   for m in ("a", "b") if status["models"][m]["settings"]["effective"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/multimodel"))
    ap.add_argument("--leave-gib", type=float, default=5.5, help="free VRAM when the two must not fit together")
    ap.add_argument("--leave-both-gib", type=float, default=12.0, help="free VRAM when both fit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["LLAMA_SUPERVISOR_CACHE"] = str(args.work / "cache")
    result: dict[str, Any] = {}

    def save() -> None:
        (args.out / "multimodel.json").write_text(json.dumps(result, indent=2))

    log("building llama-server with CUDA")
    binary = proof.build(args.source, args.jobs)
    models = {name: proof.write_big_model(args.work / f"{name}-f16.gguf", layers=8) for name in ("a", "b")}
    result["model_bytes"] = models["a"].stat().st_size
    folder = write_profiles(args.work / "profiles", binary, models)
    for case, leave in (("do not fit together", args.leave_gib), ("fit together", args.leave_both_gib)):
        holder, vram = proof.hold_vram(leave)
        log(f"{case}: holding VRAM {vram}")
        try:
            r = alternate(folder, args.work / f"state-{len(result)}", args.rounds)
        finally:
            holder.kill()
            holder.wait()
        r["vram"] = vram
        result[case] = r
        save()
    md = table(result)
    (args.out / "multimodel.md").write_text(md + "\n")
    print(md, flush=True)


def table(result: dict[str, Any]) -> str:
    def med(xs: list[float]) -> str:
        return f"{sorted(xs)[len(xs) // 2]:.2f}" if xs else "—"

    lines = [f"Two random f16 models of {result['model_bytes'] / 2**30:.1f} GiB each (8 layers), all layers on the GPU.",
             "", "| case | free VRAM | answered | OOM exits | loads | unloads | request with swap (median s) | "
             "request without (median s) | unload → ready (median s) | layers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case in ("do not fit together", "fit together"):
        r = result.get(case)
        if r is None:
            continue
        lines.append(f"| {case} | {r['vram']['free_mib']:.0f} MiB | {r['answered']}/{r['sent']} | "
                     f"{len(r['oom_exits'])} | {r['loads']} | {', '.join(r['unloads']) or '—'} | "
                     f"{med(r['request_with_swap_s'])} | {med(r['request_without_swap_s'])} | "
                     f"{med(r['swap_unload_to_ready_s'])} | {r['layers']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
