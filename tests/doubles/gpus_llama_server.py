"""A stand-in for a CUDA build of llama-server on a box of several GPUs, for what this GPU-less machine cannot
produce: devices in `--list-devices`, and an out-of-memory exit on one GPU of several.

`--list-devices` prints the listing the test gives (llama.cpp's own format). Any other start records the GPU
flags it was given (one JSON line per start: devices, split mode, tensor split, main GPU, layers), works out
the layers on each device the way llama.cpp's load_tensors does, and when one device gets more layers than
its limit (a JSON file of {"CUDA0": layers, ...}, read at every start: a GPU whose room changes between starts)
prints the real CUDA out-of-memory lines for that device and exits 1. Otherwise it drops the GPU flags (the
real server here is a CPU build, which knows no CUDA device) and execs the real llama-server, so what comes
up is real.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MIB_PER_LAYER = 416.0
LOAD_OOM = """\
ggml_backend_cuda_buffer_type_alloc_buffer: allocating {mib:.2f} MiB on device {dev}: cudaMalloc failed: out of memory
alloc_tensor_range: failed to allocate CUDA{dev} buffer of size {size}
llama_model_load: error loading model: unable to allocate CUDA{dev} buffer
llama_model_load_from_file_impl: failed to load model
main: exiting due to model loading error"""
_GPU_FLAGS = ("--device", "-dev", "--split-mode", "-sm", "--tensor-split", "-ts", "--main-gpu", "-mg")


def _value(args: list[str], *flags: str) -> str | None:
    for f in flags:
        if f in args:
            return args[args.index(f) + 1]
    return None


def per_device(devices: list[str], split: list[float], layers: int) -> dict[str, int]:
    """llama.cpp's assignment of `layers` offloaded layers to `devices` by the proportions `split`."""
    if not split or not any(split):
        split = [1.0] * len(devices)  # (llama.cpp splits by free memory; equal here)
    total = sum(split)
    cum, acc = [], 0.0
    for s in split:
        acc += s
        cum.append(acc / total)
    out = dict.fromkeys(devices, 0)
    for i in range(layers):
        j = next(k for k, c in enumerate(cum) if c > i / layers)
        out[devices[j]] += 1
    return out


def main(real: str, listing: str, limits: str, record: str, n_layers: int) -> None:
    args = sys.argv[1:]
    if args[:1] == ["--list-devices"]:
        print(listing, flush=True)
        sys.exit(0)
    if args[:1] in (["--help"], ["--version"]):
        os.execv(real, [real, *args])
    listed = [ln.split(":")[0].strip() for ln in listing.splitlines() if ln.startswith("  CUDA")]
    device = _value(args, "--device", "-dev")
    devices = device.split(",") if device else listed
    split = [float(x) for x in (_value(args, "--tensor-split", "-ts") or "").split(",") if x]
    ngl = _value(args, "--n-gpu-layers", "-ngl", "--gpu-layers") or "auto"
    layers = n_layers + 1 if ngl in ("auto", "all") else min(int(ngl), n_layers + 1)
    if devices == ["none"]:
        layers = 0
    used = per_device(devices, split, layers) if layers else {}
    with open(record, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"devices": devices, "split_mode": _value(args, "--split-mode", "-sm"),
                             "tensor_split": split, "main_gpu": _value(args, "--main-gpu", "-mg"), "ngl": ngl,
                             "layers": used, "pid": os.getpid()}) + "\n")
    room = json.loads(Path(limits).read_text()) if Path(limits).exists() else {}
    for dev, n in used.items():
        if dev in room and n > room[dev]:
            mib = MIB_PER_LAYER * n
            print(LOAD_OOM.format(mib=mib, dev=dev.removeprefix("CUDA"), size=int(mib * 2**20)), file=sys.stderr,
                  flush=True)
            sys.exit(1)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _GPU_FLAGS:
            skip = True
        else:
            kept.append(a)
    os.execv(real, [real, *kept])


def write_gpus_double(path: Path, real: str, listing: str, limits: Path, record: Path, n_layers: int) -> Path:
    from doubles.launcher import write_launcher  # the test side only

    return write_launcher(path, "gpus_llama_server",
                          f"main({real!r}, {listing!r}, {str(limits)!r}, {str(record)!r}, {n_layers})")
