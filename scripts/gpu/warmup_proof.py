#!/usr/bin/env python3
"""On a real GPU: does the supervisor's image warmup take the first-image cost off the first real request?

Builds llama-server with CUDA (as proof.py does), writes the tiny Qwen3-VL pair, and starts the supervisor
with everything on the GPU, once with warmup (which sends a small image) and once without; each time it
times the first and second image requests after ready. Also records what /status and /metrics say about
the GPU (NVML). Writes warmup.json / warmup.md to --out.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

import proof  # noqa: E402
import tiny_gguf  # noqa: E402


def image_body(shade: int) -> dict[str, Any]:
    """A 1024×768 photo-sized image; a different shade each time, so llama-server's prompt cache cannot help."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1024, 768), (10, shade, 30)).save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 1}


def one_run(profile: Path, state: Path) -> dict[str, Any]:
    import httpx
    from bench import Supervisor

    t0 = time.time()
    sup = Supervisor(profile, state)
    sup.wait_any_state(("ready", "failed"), t0, 120)
    out: dict[str, Any] = {}
    try:
        for shade, name in ((200, "first_image_ms"), (120, "second_image_ms")):
            body = image_body(shade)
            t = time.perf_counter()
            r = httpx.post(f"{sup.url}/v1/chat/completions", json=body, timeout=120)
            out[name] = round((time.perf_counter() - t) * 1000, 1)
            out["status_code"] = r.status_code
        st = sup.status()
        out["warmup"] = st.get("warmup")
        out["gpus"] = st.get("gpus")
        out["child_vram_mib"] = (st.get("child") or {}).get("vram_mib")
        metrics = httpx.get(f"{sup.url}/metrics", timeout=10).text
        out["gpu_metrics"] = [ln for ln in metrics.splitlines() if ln.startswith("llama_supervisor_gpu_")]
    finally:
        sup.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/proof"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["LLAMA_SUPERVISOR_CACHE"] = str(args.work / "cache")
    binary = proof.build(args.source, os.cpu_count() or 8)
    model, mmproj = tiny_gguf.write_tiny_qwen3vl(args.work / "vl.gguf", args.work / "mmproj-vl.gguf")
    results: dict[str, Any] = {}
    for warm in (True, False, True, False, True, False):
        profile = args.work / f"vl-{warm}.yaml"
        profile.write_text(f"name: vl\nbinary: {binary}\nmodel: {model}\nmmproj: {mmproj}\nn_gpu_layers: all\n"
                           f"ctx_size: 8192\nparallel: 1\ncache_ram_mib: 0\nwarmup: {str(warm).lower()}\n")
        r = one_run(profile, args.work / f"state-{len(results)}")
        results.setdefault("with_warmup" if warm else "without_warmup", []).append(r)
        proof.log(f"warmup={warm}: first {r['first_image_ms']} ms, second {r['second_image_ms']} ms")
    (args.out / "warmup.json").write_text(json.dumps(results, indent=2))
    lines = ["| supervisor warmup | first image request after ready (ms) | second (ms) |", "|---|---|---|"]
    for key in ("with_warmup", "without_warmup"):
        firsts = [r["first_image_ms"] for r in results[key]]
        seconds = [r["second_image_ms"] for r in results[key]]
        lines.append(f"| {key.replace('_', ' ')} | {', '.join(map(str, firsts))} | {', '.join(map(str, seconds))} |")
    sample = results["with_warmup"][0]
    lines += ["", f"GPU metrics seen: {len(sample['gpu_metrics'])} series, e.g. {sample['gpu_metrics'][:2]}",
              f"child VRAM (NVML per-process): {sample['child_vram_mib']} MiB"]
    md = "\n".join(lines)
    (args.out / "warmup.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
