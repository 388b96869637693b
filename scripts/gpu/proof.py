#!/usr/bin/env python3
"""The out-of-memory ladder and the VRAM estimate, proven on a real NVIDIA GPU.

Runs on a GPU machine (the lent H100): builds llama-server with CUDA from a source bundle, writes a
~10 GB random f16 model, holds all but ~5.5 GB of VRAM with another process (PyTorch), then
  1. finds the largest layer count that really runs (llama-server alone, --fit off, one completion);
  2. runs the supervisor with a profile asking for 99 GPU layers, VRAM estimate on, then off;
  3. runs it with n_gpu_layers: auto (llama.cpp's own fitting).
Prints a markdown table and writes proof.json / proof.md to --out.

Usage (see scripts/gpu/run.sh proof):
    python3 scripts/gpu/proof.py --source .gpu/llama-src.tar.gz --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[proof {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def build(source: Path, jobs: int) -> str:
    env = {**os.environ, "CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_FA=OFF"}
    cp = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_llama_server.py"), "--backend", "cuda",
                         "--source", str(source), "--jobs", str(jobs)], env=env, stdout=subprocess.PIPE, text=True,
                        check=True)
    return cp.stdout.strip().splitlines()[-1]


def write_big_model(path: Path, layers: int = 24, embd: int = 4096, ff: int = 14336) -> Path:
    """~10 GB of f16 noise: one random block, tiled. Same tokenizer as the tiny models."""
    import gguf
    import numpy as np
    import tiny_gguf

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    tokens, types = tiny_gguf.vocabulary()

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    block = {"attn_q": rand(embd, embd), "attn_k": rand(embd, embd), "attn_v": rand(embd, embd),
             "attn_output": rand(embd, embd), "ffn_gate": rand(ff, embd), "ffn_up": rand(ff, embd),
             "ffn_down": rand(embd, ff)}
    norm = np.ones(embd, dtype=np.float32)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("big-random-llama")
    w.add_context_length(8192)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_rope_dimension_count(embd // 32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tiny_gguf._add_tokenizer(w, tokens, types)
    w.add_tensor("token_embd.weight", rand(len(tokens), embd))
    w.add_tensor("output_norm.weight", norm)
    w.add_tensor("output.weight", rand(len(tokens), embd))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        for name, arr in block.items():
            if name in ("attn_k", "attn_v"):
                arr = arr[: embd // 4]  # 8 KV heads of 32
            w.add_tensor(f"blk.{i}.{name}.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hold_vram(leave_gib: float) -> tuple[subprocess.Popen[str], dict[str, float]]:
    code = (
        "import sys, time, torch\n"
        "free, total = torch.cuda.mem_get_info()\n"
        f"n = free - int({leave_gib} * 2**30)\n"
        "x = torch.empty(n, dtype=torch.uint8, device='cuda')\n"
        "free2, _ = torch.cuda.mem_get_info()\n"
        "print(f'held {n / 2**20:.0f} {free2 / 2**20:.0f} {total / 2**20:.0f}', flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE, text=True, env=_plain_env())
    line = proc.stdout.readline() if proc.stdout else ""
    parts = line.split()
    if not parts or parts[0] != "held":
        raise SystemExit(f"could not hold VRAM: {line!r}")
    return proc, {"held_mib": float(parts[1]), "free_mib": float(parts[2]), "total_mib": float(parts[3])}


def _plain_env() -> dict[str, str]:
    """Without the carried wheels on the path: PyTorch uses the machine's own packages."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def probe_direct(binary: str, model: Path, ngl: int, port: int) -> dict[str, Any]:
    """Does llama-server alone run with `ngl` layers (load, its own warmup, one completion)?"""
    import httpx

    t0 = time.monotonic()
    proc = subprocess.Popen([binary, "--model", str(model), "--port", str(port), "--ctx-size", "4096", "-ngl",
                             str(ngl), "--fit", "off", "--cache-ram", "0", "-np", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ok, why = False, ""
    try:
        while time.monotonic() - t0 < 60:
            if proc.poll() is not None:
                why = f"exit {proc.returncode}"
                break
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    r = httpx.post(f"http://127.0.0.1:{port}/completion", json={"prompt": "hi", "n_predict": 4},
                                   timeout=30)
                    ok, why = r.status_code == 200, f"completion {r.status_code}"
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
    if not ok and "out of memory" in err:
        why += " (out of memory)"
    return {"ngl": ngl, "ok": ok, "why": why, "seconds": round(time.monotonic() - t0, 2)}


def run_supervisor(profile: Path, state: Path, estimate: bool, timeout: float = 150) -> dict[str, Any]:
    from bench import Supervisor

    t0 = time.time()
    sup = Supervisor(profile, state, {"LLAMA_SUPERVISOR_ESTIMATE_VRAM": "true" if estimate else "false",
                                      "LLAMA_SUPERVISOR_BACKOFF_BASE_S": "0.2",
                                      "LLAMA_SUPERVISOR_BREAKER_FAILURES": "10"})
    end = sup.wait_any_state(("ready", "failed"), t0, timeout)
    try:
        status = sup.status()
    except Exception:  # noqa: BLE001 - a report of what happened, whatever happened
        status = {}
    sup.stop()
    spawns = [e for e in sup.events if e.get("event") == "child_spawn"]
    exits = [e for e in sup.events if e.get("event") == "child_exit" and e.get("cause") != "stopped"]
    return {
        "estimate": estimate,
        "layers_tried": [s["settings"]["n_gpu_layers"] for s in spawns],
        "causes": [e["cause"] for e in exits],
        "outcome": end["to"] if end else "timeout",
        "seconds_to_ready": round(end["_t"] - t0, 2) if end and end["to"] == "ready" else None,
        "adjustment": (status.get("settings") or {}).get("adjustment"),
        "vram_estimate": (status.get("settings") or {}).get("vram_estimate"),
        "child_vram_mib": (status.get("child") or {}).get("vram_mib"),
        "exit_details": [e.get("detail") for e in exits],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/proof"))
    ap.add_argument("--leave-gib", type=float, default=5.5)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["LLAMA_SUPERVISOR_CACHE"] = str(args.work / "cache")
    result: dict[str, Any] = {}

    def save() -> None:
        (args.out / "proof.json").write_text(json.dumps(result, indent=2))

    model_thread_result: dict[str, Any] = {}

    def make_model() -> None:
        t = time.monotonic()
        model_thread_result["path"] = write_big_model(args.work / "big-f16.gguf")
        model_thread_result["seconds"] = round(time.monotonic() - t, 1)

    mt = threading.Thread(target=make_model)
    mt.start()  # writing 10 GB overlaps with the compile
    log("building llama-server with CUDA")
    t = time.monotonic()
    binary = build(args.source, args.jobs)
    result["build_s"] = round(time.monotonic() - t, 1)
    log(f"built {binary} in {result['build_s']}s")
    mt.join()
    model = model_thread_result["path"]
    result["model"] = {"path": str(model), "bytes": model.stat().st_size, "write_s": model_thread_result["seconds"]}
    log(f"model {model.stat().st_size / 2**30:.1f} GiB written in {model_thread_result['seconds']}s")
    save()

    holder, vram = hold_vram(args.leave_gib)
    result["vram"] = vram
    log(f"holding VRAM: {vram}")
    try:
        probes = []
        for ngl in (9, 10, 11, 12, 13):
            probes.append(probe_direct(binary, model, ngl, 18900 + ngl))
            log(f"direct -ngl {ngl}: {probes[-1]}")
        result["direct"] = probes
        fits = [p["ngl"] for p in probes if p["ok"]]
        result["largest_fitting"] = max(fits) if fits else None
        save()
        runs = []
        scenarios = (("99, estimate on", 99, True), ("99, estimate off", 99, False), ("auto", "auto", True),
                     ("12, estimate off", 12, False), ("13, estimate off", 13, False))
        for name, layers, est in scenarios:
            profile = args.work / f"profile-{len(runs)}.yaml"
            profile.write_text(
                f"name: proof\nbinary: {binary}\nmodel: {model}\nn_gpu_layers: {layers}\nctx_size: 4096\n"
                "min_ctx_size: 1024\ncache_ram_mib: 0\nparallel: 1\n")
            r = run_supervisor(profile, args.work / f"state-{len(runs)}", est)
            r["name"], r["asked"] = name, layers
            runs.append(r)
            log(f"{name}: {r}")
            result["runs"] = runs
            save()
    finally:
        holder.kill()

    lines = [
        f"GPU: {vram['total_mib']:.0f} MiB, {vram['held_mib']:.0f} MiB held by another process, "
        f"{vram['free_mib']:.0f} MiB free; model {result['model']['bytes'] / 2**30:.1f} GiB f16, 24 layers; "
        f"largest layer count that runs alone: {result['largest_fitting']}",
        "",
        "| profile | layers tried | causes | outcome | seconds to ready |",
        "|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {' → '.join(map(str, r['layers_tried']))} | {', '.join(r['causes']) or '—'} | "
                     f"{r['outcome']} | {r['seconds_to_ready']} |")
    publish(args.out / "proof.md", lines)
    save()


def publish(path: Path, lines: list[str]) -> None:
    """The markdown table: printed (the device run's output) and written under $OUT."""
    md = "\n".join(lines)
    path.write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
