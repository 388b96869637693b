#!/usr/bin/env python3
"""Climbing back after the out-of-memory ladder, proven on a real NVIDIA GPU (issue 11).

One run on the lent H100: builds llama-server with CUDA from the source bundle, writes the ~10 GB random f16
model of proof.py (24 layers of ~416 MiB), and holds VRAM with another process (PyTorch) so that only
--tight-gib are free. Then:
  A. a supervisor (profile: n_gpu_layers 99, own state directory) starts on the VRAM estimate and learns a low
     count; the holder gives back VRAM until --roomy-gib are free; while idle, the supervisor re-estimates every
     climb_interval_s and restarts itself at a higher count: the test is that it ends on the largest count that
     llama-server alone runs with the same VRAM (probed directly afterwards);
  B. a supervisor with the estimate off learns a low count from the ladder alone (own state directory), then,
     with the VRAM given back, a new supervisor on the same state directory starts higher at once.
Prints a markdown table and writes climb.json / climb.md to --out.

Usage (see scripts/gpu/run.sh climb):
    python3 scripts/gpu/climb_proof.py --source .gpu/llama-src.tar.gz --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import proof  # noqa: E402 - the build, the model and the direct probe are proof.py's

log = proof.log

HOLDER = """
import sys, torch
chunk = 256 * 2**20
free, total = torch.cuda.mem_get_info()
n = (free - int(float(sys.argv[1]) * 2**30)) // chunk
held = [torch.empty(chunk, dtype=torch.uint8, device='cuda') for _ in range(n)]
def report():
    free, total = torch.cuda.mem_get_info()
    print(f'held {len(held) * chunk / 2**20:.0f} {free / 2**20:.0f} {total / 2**20:.0f}', flush=True)
report()
for line in sys.stdin:
    verb, gib = line.split()
    k = int(float(gib) * 2**30) // chunk
    if verb == 'release':
        del held[len(held) - min(k, len(held)):]
        torch.cuda.empty_cache()
    else:
        held += [torch.empty(chunk, dtype=torch.uint8, device='cuda') for _ in range(k)]
    report()
"""


class Holder:
    """Another process holding VRAM in 256 MiB pieces; it gives some back or takes more on request."""

    def __init__(self, leave_gib: float) -> None:
        self.proc = subprocess.Popen(["python3", "-c", HOLDER, str(leave_gib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=proof._plain_env())
        self.last = self._read()

    def _read(self) -> dict[str, float]:
        assert self.proc.stdout is not None
        parts = self.proc.stdout.readline().split()
        if not parts or parts[0] != "held":
            raise SystemExit(f"VRAM holder failed: {parts}")
        return {"held_mib": float(parts[1]), "free_mib": float(parts[2]), "total_mib": float(parts[3])}

    def send(self, verb: str, gib: float) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{verb} {gib}\n")
        self.proc.stdin.flush()
        self.last = self._read()
        return self.last

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def spawned_layers(sup: Any) -> list[Any]:
    return [e["settings"]["n_gpu_layers"] for e in sup.events if e.get("event") == "child_spawn"]


def wait_event(sup: Any, pred: Any, timeout: float) -> dict[str, Any] | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for ev in list(sup.events):
            if pred(ev):
                return ev
        time.sleep(0.05)
    return None


def start(profile: Path, state: Path, estimate: bool, climb_interval: float) -> Any:
    from bench import Supervisor

    return Supervisor(profile, state, {"LLAMA_SUPERVISOR_ESTIMATE_VRAM": "true" if estimate else "false",
                                       "LLAMA_SUPERVISOR_BACKOFF_BASE_S": "0.2",
                                       "LLAMA_SUPERVISOR_CLIMB_INTERVAL_S": str(climb_interval),
                                       "LLAMA_SUPERVISOR_VRAM_RELEASE_WAIT_S": "5"})


def ready_layers(sup: Any, after: float, timeout: float = 150) -> tuple[Any, float | None]:
    """The layer count the child runs with at the first `ready` after `after`, and when it got there."""
    ev = sup.wait_any_state(("ready", "failed"), after, timeout)
    if ev is None or ev["to"] != "ready":
        return None, None
    try:
        eff = sup.status()["settings"]["effective"]
    except Exception:  # noqa: BLE001 - a report of what happened, whatever happened
        return None, ev["_t"]
    return eff["n_gpu_layers"], ev["_t"]


def scenario_a(binary: str, model: Path, work: Path, holder: Holder, release_gib: float, interval: float
               ) -> dict[str, Any]:
    """Learn low on the estimate, release VRAM, climb while running."""
    profile = write_profile(work / "profile-a.yaml", binary, model)
    t0 = time.time()
    sup = start(profile, work / "state-a", estimate=True, climb_interval=interval)
    out: dict[str, Any] = {"name": "A: climb while running"}
    try:
        out["low"], t_ready = ready_layers(sup, t0)
        out["low_ready_s"] = round(t_ready - t0, 2) if t_ready else None
        log(f"A: ready on {out['low']} layers; releasing {release_gib} GiB of VRAM")
        out["vram_after_release"] = holder.send("release", release_gib)
        t_rel = time.time()
        climb = wait_event(sup, lambda e: e.get("event") == "climb" and e["_t"] >= t_rel, interval * 3 + 30)
        out["climb_detail"] = climb.get("detail") if climb else None
        out["climbed_to"], t_up = ready_layers(sup, climb["_t"] if climb else t_rel, 150) if climb else (None, None)
        out["climb_ready_s"] = round(t_up - t_rel, 2) if t_up else None
        # One more interval: does it try again (it should not, unless more fits)?
        time.sleep(interval * 2 + 2)
        out["layers_spawned"] = spawned_layers(sup)
        out["exits"] = [e["cause"] for e in sup.events if e.get("event") == "child_exit" and e["cause"] != "stopped"]
        st = sup.status()
        out["climb_status"] = (st.get("settings") or {}).get("climb")
        out["child_vram_mib"] = (st.get("child") or {}).get("vram_mib")
    finally:
        sup.stop()
    return out


def scenario_b(binary: str, model: Path, work: Path, holder: Holder, release_gib: float) -> dict[str, Any]:
    """Learn low with the ladder alone (estimate off), then a new start with VRAM given back."""
    profile = write_profile(work / "profile-b.yaml", binary, model)
    out: dict[str, Any] = {"name": "B: climb at the next start"}
    holder.send("grab", release_gib)
    t0 = time.time()
    sup = start(profile, work / "state-b", estimate=False, climb_interval=3600)
    try:
        out["low"], _ = ready_layers(sup, t0)
        out["ladder"] = spawned_layers(sup)
    finally:
        sup.stop()
    out["vram_after_release"] = holder.send("release", release_gib)
    t1 = time.time()
    sup = start(profile, work / "state-b", estimate=False, climb_interval=3600)
    try:
        out["climbed_to"], t_up = ready_layers(sup, t1)
        out["climb_ready_s"] = round(t_up - t1, 2) if t_up else None
        out["layers_spawned"] = spawned_layers(sup)
        climb = wait_event(sup, lambda e: e.get("event") == "climb", 1)
        out["climb_detail"] = climb.get("detail") if climb else None
    finally:
        sup.stop()
    return out


def write_profile(path: Path, binary: str, model: Path) -> Path:
    path.write_text(f"name: climb\nbinary: {binary}\nmodel: {model}\nn_gpu_layers: 99\nctx_size: 4096\n"
                    "min_ctx_size: 1024\ncache_ram_mib: 0\nparallel: 1\n")
    return path


def largest_direct(binary: str, model: Path, start_at: int) -> tuple[int | None, list[dict[str, Any]]]:
    """The largest layer count llama-server alone runs now, probing upwards from `start_at`."""
    probes: list[dict[str, Any]] = []
    best = None
    for ngl in range(max(1, start_at - 1), 26):
        p = proof.probe_direct(binary, model, ngl, proof_port())
        probes.append(p)
        log(f"direct -ngl {ngl}: {p}")
        if not p["ok"]:
            break
        best = ngl
    return best, probes


def proof_port() -> int:
    from bench import free_port

    return free_port()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/proof"))
    ap.add_argument("--tight-gib", type=float, default=3.2)
    ap.add_argument("--roomy-gib", type=float, default=8.0)
    ap.add_argument("--climb-interval", type=float, default=5.0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["LLAMA_SUPERVISOR_CACHE"] = str(args.work / "cache")
    result: dict[str, Any] = {"tight_gib": args.tight_gib, "roomy_gib": args.roomy_gib}

    def save() -> None:
        (args.out / "climb.json").write_text(json.dumps(result, indent=2))

    made: dict[str, Any] = {}
    mt = threading.Thread(target=lambda: made.update(path=proof.write_big_model(args.work / "big-f16.gguf")))
    mt.start()  # writing 10 GB overlaps with the compile
    log("building llama-server with CUDA")
    binary = proof.build(args.source, args.jobs)
    mt.join()
    model = made["path"]
    release = args.roomy_gib - args.tight_gib
    holder = Holder(args.tight_gib)
    result["vram_tight"] = holder.last
    log(f"holding VRAM: {holder.last}")
    try:
        result["a"] = a = scenario_a(binary, model, args.work, holder, release, args.climb_interval)
        log(f"A: {a}")
        save()
        result["largest_direct_roomy"], result["direct_roomy"] = largest_direct(
            binary, model, int(a["climbed_to"]) if isinstance(a.get("climbed_to"), int) else 1)
        save()
        result["b"] = b = scenario_b(binary, model, args.work, holder, release)
        log(f"B: {b}")
        holder.send("grab", release)
        result["largest_direct_tight"], result["direct_tight"] = largest_direct(
            binary, model, int(a["low"]) if isinstance(a.get("low"), int) else 1)
        save()
    finally:
        holder.close()

    tight, roomy = result["largest_direct_tight"], result["largest_direct_roomy"]
    lines = [
        (f"GPU: {result['vram_tight']['total_mib']:.0f} MiB; another process leaves {args.tight_gib} GiB free, then "
         f"gives back {release:.1f} GiB ({args.roomy_gib} GiB free); model 24 layers of ~416 MiB (f16), ctx 4096. "
         f"llama-server alone runs up to {tight} layers with {args.tight_gib} GiB, {roomy} with {args.roomy_gib} GiB."),
        "",
        "| run | learned (tight) | layers started | after the VRAM came back | seconds to ready on the higher count |",
        "|---|---|---|---|---|",
    ]
    for r in (result["a"], result["b"]):
        spawned = " → ".join(map(str, r.get("layers_spawned") or []))
        lines.append(f"| {r['name']} | {r.get('low')} | {spawned} | {r.get('climbed_to')} | {r.get('climb_ready_s')} |")
    proof.publish(args.out / "climb.md", lines)
    save()


if __name__ == "__main__":
    main()
