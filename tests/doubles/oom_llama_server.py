"""A stand-in for llama-server on a GPU that is too small, for the faults this GPU-less machine cannot produce.

It takes llama-server's arguments. When --n-gpu-layers is above a limit it prints the real CUDA
out-of-memory lines (captured on an H100, see shared/llama-server-notes.md) and fails the way the real
server does: exit 1 at load, or abort (SIGABRT) at the first compute. Otherwise, and for --help and
--version, it execs the real llama-server with the same arguments, so what comes up is real.

`write_double(path, real, limit, mode, record)` writes an executable copy configured for one test; `limit` may
be a file holding the number, read at every start (a GPU whose free memory changes between starts). With
`ledger` (a folder) the doubles share one pretend GPU of `limit` layers: each running double notes its layers
there, and a start fails when its layers plus those of the other live doubles exceed the limit — an idle
model holding the VRAM, as on a real card.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MIB_PER_LAYER = 416.0

LOAD_OOM = """\
llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:00.0) - 5632 MiB free
ggml_backend_cuda_buffer_type_alloc_buffer: allocating {mib:.2f} MiB on device 0: cudaMalloc failed: out of memory
alloc_tensor_range: failed to allocate CUDA0 buffer of size {size}
llama_model_load: error loading model: unable to allocate CUDA0 buffer
llama_model_load_from_file_impl: failed to load model
srv    load_model: failed to load model, '{model}'
srv    operator(): operator(): cleaning up before exit...
main: exiting due to model loading error"""

COMPUTE_OOM = """\
llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:00.0) - 5632 MiB free
ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1536.00 MiB on device 0: cudaMalloc failed: out of memory
ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 1610612736
ggml_cuda_compute_forward: MUL_MAT failed
CUDA error: out of memory
  current device: 0, in function ggml_cuda_compute_forward at ggml/src/ggml-cuda/ggml-cuda.cu:2751
  err
ggml/src/ggml-cuda/ggml-cuda.cu:90: CUDA error"""


def _held_by_others(ledger: Path) -> int:
    held = 0
    for entry in ledger.iterdir():
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                if fh.read().split(") ", 1)[1].startswith("Z"):
                    continue  # exited, not reaped yet: its memory is free
        except (ProcessLookupError, FileNotFoundError):
            continue
        held += int(entry.read_text() or 0)
    return held


def main(real: str, limit: int | str, mode: str, record: str, ledger: str | None = None) -> None:
    args = sys.argv[1:]
    if isinstance(limit, str):
        limit = int(Path(limit).read_text().strip())
    flag = next((f for f in ("--n-gpu-layers", "-ngl", "--gpu-layers") if f in args), None)
    if flag is not None:
        value = args[args.index(flag) + 1]
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(value + "\n")
        layers = 10**6 if value in ("auto", "all") else int(value)
        others = _held_by_others(Path(ledger)) if ledger else 0
        if layers + others > limit:
            model = args[args.index("--model") + 1] if "--model" in args else "?"
            if mode == "load":
                mib = MIB_PER_LAYER * min(layers, 25)
                print(LOAD_OOM.format(mib=mib, size=int(mib * 2**20), model=model), file=sys.stderr, flush=True)
                sys.exit(1)
            print(COMPUTE_OOM, file=sys.stderr, flush=True)
            os.abort()
        if ledger:
            (Path(ledger) / str(os.getpid())).write_text(str(layers))  # exec keeps the pid
    os.execv(real, [real, *args])


def write_double(path: Path, real: str, limit: int | Path, mode: str, record: Path, ledger: Path | None = None
                 ) -> Path:
    from doubles.launcher import write_launcher  # the test side only: the double itself never needs it

    limit_arg = repr(str(limit)) if isinstance(limit, Path) else str(limit)
    ledger_arg = repr(str(ledger)) if ledger else "None"
    return write_launcher(path, "oom_llama_server",
                          f"main({real!r}, {limit_arg}, {mode!r}, {str(record)!r}, {ledger_arg})")
