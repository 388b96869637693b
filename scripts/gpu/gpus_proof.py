#!/usr/bin/env python3
"""Several GPUs on one box, proven on real NVIDIA GPUs (issue 22). Runs on the lent machine: `run.sh gpus`.

Builds llama-server with CUDA from the source bundle, writes random f16 llama models (~416 MiB a layer), and holds
VRAM on each GPU with another process (PyTorch) so that the GPUs have different free room. Then, with the
supervisor (`llama-supervisor run`, JSON log read) and NVML's own per-process figures as the witness:
  match   llama-server's --list-devices matched to NVML (names, memory, UUIDs);                       (any GPUs)
  pin     `gpus: [0]` (one GPU: the model runs there, --device CUDA0), and a GPU the box lacks refused by
          `llama-supervisor check` naming the GPUs seen;                                             (any GPUs)
  spread  two models that each fit on one GPU land on different GPUs, both resident, each on one card,
          and alternating requests between them load each once (no thrash);                            (2+ GPUs)
  split   a model bigger than either GPU's room is split over both and answers;                         (2+ GPUs)
  choose  `gpus: [1]` is respected where GPU 0 would be the best fit;                                  (2+ GPUs)
  move    an out-of-memory exit on one GPU (another process grabs it as the child starts) moves the model to
          the GPU with room, layers untouched, instead of cutting layers.                             (2+ GPUs)
Prints a markdown table and writes gpus.json / gpus.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
sys.path.insert(0, str(ROOT))

import proof  # noqa: E402  (build, write_big_model)

T0 = time.monotonic()
PROMPT = {"prompt": "hello", "max_tokens": 8, "temperature": 0}
ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # the holder numbers GPUs as NVML (and the supervisor's children) do


def log(msg: str) -> None:
    print(f"[gpus {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ---- VRAM held by another process -------------------------------------------------------------------------------

HOLDER = """
import os, sys, time, torch
leave = [float(x) for x in sys.argv[1].split(',')]
grab_on, trigger = (int(sys.argv[2]), sys.argv[3]) if len(sys.argv) > 3 else (None, '')
held = []
for i, gib in enumerate(leave):
    free, total = torch.cuda.mem_get_info(i)
    n = free - int(gib * 2**30)
    if n > 0:
        held.append(torch.empty(n, dtype=torch.uint8, device=f'cuda:{i}'))
print('held ' + ' '.join(f'{torch.cuda.mem_get_info(i)[0] / 2**20:.0f}' for i in range(len(leave))), flush=True)
if grab_on is not None:
    # The 'something else took the GPU' of a real box: as soon as a llama-server that was placed on this GPU
    # starts (before it has allocated anything), take all but 512 MiB of what is free there.
    seen = set()
    while True:
        for pid in os.listdir('/proc'):
            if not pid.isdigit() or pid in seen:
                continue
            seen.add(pid)
            try:
                cmd = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')
            except OSError:
                continue
            if b'--device' in cmd and cmd[cmd.index(b'--device') + 1] == trigger.encode():
                free, _ = torch.cuda.mem_get_info(grab_on)
                held.append(torch.empty(free - 512 * 2**20, dtype=torch.uint8, device=f'cuda:{grab_on}'))
                print(f'grabbed {pid}', flush=True)
                time.sleep(3600)
        time.sleep(0.005)
time.sleep(3600)
"""


def hold(leave_gib: list[float], grab: tuple[int, str] | None = None) -> tuple[subprocess.Popen[str], list[float]]:
    """Hold all but `leave_gib[i]` GiB free on GPU i; with `grab` = (gpu, device name), also grab that GPU when a
    child placed on it starts. Returns the process and the free MiB per GPU after holding."""
    args = ["python3", "-c", HOLDER, ",".join(map(str, leave_gib))] + ([str(grab[0]), grab[1]] if grab else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**proof._plain_env(), **ORDER})
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("held "):
        raise SystemExit(f"could not hold VRAM: {line!r}")
    return proc, [float(x) for x in line.split()[1:]]


def release(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    time.sleep(1.0)  # the driver frees the memory a little after


# ---- the supervisor ---------------------------------------------------------------------------------------------


def write_profile(folder: Path, name: str, binary: str, model: Path, **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"name: {name}", f"binary: {binary}", f"model: {model}", "n_gpu_layers: all", "ctx_size: 4096",
             "min_ctx_size: 1024", "cache_ram_mib: 0", "parallel: 1"] + [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def nvml_children() -> dict[int, dict[int, float]]:
    """pid → {NVML GPU index: MiB} for every compute process NVML lists (the witness, not the supervisor's view)."""
    from supervisor.host import gpu

    out: dict[int, dict[int, float]] = {}
    for g in gpu.snapshot():
        for pid, mib in g.processes:
            out.setdefault(pid, {})[g.index] = round(mib)
    return out


def spawns(sup: Any) -> list[dict[str, Any]]:
    """Each child start: its model (--alias) and the GPU flags and layers of its command line."""
    out = []
    for e in sup.events:
        if e.get("event") == "child_spawn":
            argv = e.get("argv", [])
            out.append({f: argv[argv.index(f) + 1] for f in ("--alias", "--device", "--tensor-split", "--split-mode",
                                                              "--n-gpu-layers") if f in argv})
    return out


def run_case(profile: Path, state: Path, requests: list[str], env: dict[str, str] | None = None,
             timeout: float = 180) -> dict[str, Any]:
    """Start the supervisor, send completions to `requests` (model ids) in order, and report what happened."""
    import httpx
    from bench import Supervisor

    t0 = time.time()
    sup = Supervisor(profile, state, {"LLAMA_SUPERVISOR_QUEUE_WAIT_S": "300", "LLAMA_SUPERVISOR_SWAP_PASS_OVER_S": "1",
                                      "LLAMA_SUPERVISOR_BACKOFF_BASE_S": "0.2", **(env or {})})
    answers: list[dict[str, Any]] = []
    held: dict[int, dict[int, float]] = {}
    try:
        if sup.wait_any_state(("ready", "failed"), t0, timeout) is None:
            raise SystemExit(f"{profile.name}: nothing became ready in {timeout}s")
        with httpx.Client(base_url=sup.url or "", timeout=timeout) as c:
            for model in requests:
                t = time.monotonic()
                r = c.post("/v1/completions", json={**PROMPT, "model": model})
                answers.append({"model": model, "status": r.status_code, "seconds": round(time.monotonic() - t, 2)})
                log(f"  {model}: {answers[-1]}")
            held = nvml_children()
            status = c.get("/status").json()
    finally:
        sup.stop()
    exits = [e for e in sup.events if e.get("event") == "child_exit" and e.get("cause") != "stopped"]
    return {"answers": answers, "answered": sum(a["status"] == 200 for a in answers), "sent": len(answers),
            "spawns": spawns(sup), "placements": [e for e in sup.events if e.get("event") == "placement"],
            "exits": [f"{e.get('cause')}: {e.get('detail', '')[:160]}" for e in exits],
            "loads": sum(e.get("event") == "model_load" for e in sup.events),
            "unloads": [e.get("model") for e in sup.events if e.get("event") == "model_unload"
                        and e.get("reason") != "shutdown"],
            "states": [e.get("detail") or e.get("cause") for e in sup.events if e.get("event") == "state"
                       and e.get("to") == "backoff"],
            "nvml_vram_by_pid": {str(k): v for k, v in held.items()}, "status": status}


# ---- the cases --------------------------------------------------------------------------------------------------


def case_match(binary: str) -> dict[str, Any]:
    from supervisor.host import devices, gpu, probe

    caps = probe.probe(binary)
    gpus, why = devices.named(caps)
    return {"listing": [vars(d) for d in caps.listing], "nvml": [g.as_dict() for g in gpu.snapshot()],
            "named": {g.index: g.device for g in gpus}, "unmatched": why}


def case_refused(binary: str, model: Path, work: Path, count: int) -> dict[str, Any]:
    bad = write_profile(work / "refused", "nope", binary, model, gpus=[count])
    cp = subprocess.run([sys.executable, "-m", "supervisor", "check", str(bad)], cwd=ROOT,
                        capture_output=True, text=True, check=False)
    return {"returncode": cp.returncode, "output": (cp.stdout + cp.stderr).strip()[-600:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpus"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating request rounds in 'spread'")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # A CUDA build left by an earlier proof on the same (still warm) machine is used as is: LLAMA_SUPERVISOR_CACHE.
    os.environ.setdefault("LLAMA_SUPERVISOR_CACHE", str(args.work / "cache"))
    os.environ.update(ORDER)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, check=False).stdout.strip().splitlines()}

    def save() -> None:
        (args.out / "gpus.json").write_text(json.dumps(result, indent=2, default=str))

    log("building llama-server with CUDA")
    binary = proof.build(args.source, args.jobs)
    result["match"] = match = case_match(binary)
    count = len(match["nvml"])
    # ~3.3 GiB each; the second only where there is a second GPU for it
    small = {n: proof.write_big_model(args.work / f"{n}-f16.gguf", layers=8) for n in ("ab" if count >= 2 else "a")}
    log(f"{count} GPU(s); matched: {match['named']} ({match['unmatched'] or 'ok'})")
    save()
    result["refused"] = case_refused(binary, small["a"], args.work, count)
    cases: list[tuple[str, list[float], Path, list[str], tuple[int, str] | None]] = []
    solo = args.work / "solo"
    cases.append(("pin", [12.0] + [60.0] * (count - 1), write_profile(solo, "a", binary, small["a"], gpus=[0]),
                  ["a"], None))
    if count >= 2:
        both = args.work / "both"
        write_profile(both, "b", binary, small["b"])
        cases.append(("spread", [6.0, 9.0] + [0.0] * (count - 2), write_profile(both, "a", binary, small["a"]),
                      ["a", "b"] * args.rounds, None))
        big = proof.write_big_model(args.work / "big-f16.gguf")  # ~10 GiB: 24 layers
        cases.append(("split", [7.0, 7.0] + [0.0] * (count - 2),
                      write_profile(args.work / "big", "big", binary, big), ["big"], None))
        cases.append(("choose", [6.0, 30.0] + [0.0] * (count - 2),
                      write_profile(args.work / "one", "a", binary, small["a"], gpus=[1]), ["a"], None))
        cases.append(("move", [8.0, 40.0] + [0.0] * (count - 2),
                      write_profile(args.work / "move", "a", binary, small["a"]), ["a"], (0, "CUDA0")))
    for name, leave, profile, requests, grab in cases:
        holder, free = hold(leave, grab)
        log(f"{name}: free MiB per GPU {free}")
        try:
            env = {"LLAMA_SUPERVISOR_PROFILES_DIR": str(profile.parent)}
            r = run_case(profile, args.work / f"state-{name}", requests, env)
        finally:
            release(holder)
        r["free_mib"] = free
        result[name] = r
        log(f"{name}: spawns {r['spawns']} exits {r['exits']} unloads {r['unloads']} nvml {r['nvml_vram_by_pid']}")
        save()
    md = table(result)
    (args.out / "gpus.md").write_text(md + "\n")
    print(md, flush=True)


def table(result: dict[str, Any]) -> str:
    m = result["match"]
    lines = [f"{result['date']}, {'; '.join(result['machine'])}.", "",
             f"Matching: {', '.join(f'GPU {i} = {d or chr(8212)}' for i, d in m['named'].items())}"
             + (f" (unmatched: {m['unmatched']})" if m["unmatched"] else "") + ".",
             f"A GPU the box lacks: `check` exits {result['refused']['returncode']}: "
             f"`{result['refused']['output'].splitlines()[-1] if result['refused']['output'] else ''}`", "",
             "| case | free MiB per GPU | starts (--device, --tensor-split, -ngl) | exits | answered | loads | unloads |"
             " VRAM per child by NVML (GPU: MiB) |", "|---|---|---|---|---|---|---|---|"]
    for name in ("pin", "spread", "split", "choose", "move"):
        r = result.get(name)
        if r is None:
            continue
        starts = "; ".join(f"{s.get('--alias', '?')}: {s.get('--device', '—')} {s.get('--tensor-split', '')} "
                           f"-ngl {s.get('--n-gpu-layers', '')}" for s in r["spawns"])
        vram = "; ".join(", ".join(f"{g}: {mib}" for g, mib in v.items()) for v in r["nvml_vram_by_pid"].values())
        lines.append(f"| {name} | {', '.join(f'{x:.0f}' for x in r['free_mib'])} | {starts} | "
                     f"{len(r['exits'])} {'(' + r['exits'][0][:60] + ')' if r['exits'] else ''} | "
                     f"{r['answered']}/{r['sent']} | {r['loads']} | {len(r['unloads'])} | {vram} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
