"""Crash classification against the real log lines llama-server prints (see shared/llama-server-notes.md)."""

from __future__ import annotations

import signal

import pytest

from supervisor.core.crash import FATAL_WHILE_RUNNING, Cause, Exit, classify

CUDA_LOAD_OOM = (
    "llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H100 80GB HBM3) - 5632 MiB free",
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9986.82 MiB on device 0: cudaMalloc failed: out of memory",
    "alloc_tensor_range: failed to allocate CUDA0 buffer of size 10472079360",
    "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
    "llama_model_load_from_file_impl: failed to load model",
    "srv    load_model: failed to load model, '/models/big.gguf'",
    "srv    operator(): operator(): cleaning up before exit...",
    "main: exiting due to model loading error",
)
CUDA_FIT_ABORT = (
    "common_fit_params: failed to fit params to free device memory: n_gpu_layers already set by user to 99, abort",
) + CUDA_LOAD_OOM
CUDA_COMPUTE_OOM = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1024.00 MiB on device 0: cudaMalloc failed: out of memory",
    "ggml_cuda_compute_forward: MUL_MAT failed",
    "CUDA error: out of memory",
    "  current device: 0, in function ggml_cuda_compute_forward at ggml-cuda.cu:2500",
    "/src/ggml-cuda.cu:88: CUDA error",
)
KV_OOM = ("llama_kv_cache: failed to allocate buffer for kv cache", "llama_init_from_model: failed to create context",
          "srv    load_model: failed to load model")
METAL_OOM = ("ggml_metal_graph_compute: command buffer 0 failed with status 5",
             "error: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
             "decode: failed to decode, ret = -3", "ggml_metal: backend is in error state from a previous command buffer")
VULKAN_OOM = ("ggml_vulkan: Device memory allocation of size 4294967296 failed.",
              "ggml_vulkan: vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
              "llama_model_load: error loading model: unable to allocate Vulkan0 buffer")
HOST_ALLOC = ("ggml_aligned_malloc: insufficient memory (attempted to allocate 24576.00 MB)",
              "alloc_tensor_range: failed to allocate CPU buffer of size 25769803776",
              "llama_model_load: error loading model: unable to allocate CPU buffer")
MISMATCH = ("clip_model_loader: model name:   tiny", "srv    load_model: loaded multimodal model, '/m/mmproj.gguf'",
            "mtmd_init_from_file: error: mismatch between text model (n_embd = 64) and mmproj (n_embd = 128)",
            "srv    load_model: failed to load multimodal model, '/m/mmproj.gguf'",
            "srv    operator(): operator(): cleaning up before exit...", "main: exiting due to model loading error")
MISSING = ("gguf_init_from_file: failed to open GGUF file '/nope.gguf'",
           "llama_model_load: error loading model: llama_model_loader: failed to load model from /nope.gguf",
           "srv    load_model: failed to load model, '/nope.gguf'")
PORT = ("srv    start: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080",
        "srv  llama_server: exiting due to HTTP server error")
BAD_ARG = ("error: invalid argument: --metal",)

ABRT, KILL, SEGV = -signal.SIGABRT, -signal.SIGKILL, -signal.SIGSEGV


@pytest.mark.parametrize(
    ("rc", "lines", "cause"),
    [
        (1, CUDA_LOAD_OOM, Cause.OOM_LOAD),
        (1, CUDA_FIT_ABORT, Cause.OOM_LOAD),
        (ABRT, CUDA_LOAD_OOM, Cause.OOM_LOAD),  # the cleanup after a failed load aborted
        (ABRT, CUDA_COMPUTE_OOM, Cause.OOM_COMPUTE),
        (1, KV_OOM, Cause.OOM_LOAD),
        (1, VULKAN_OOM, Cause.OOM_LOAD),
        (1, HOST_ALLOC, Cause.OOM_HOST),
        (ABRT, ("terminate called after throwing an instance of 'std::bad_alloc'", "  what():  std::bad_alloc"),
         Cause.OOM_HOST),
        # A SIGKILL we did not send, and no cgroup counter to say who did: not guessed to be the OOM killer.
        (KILL, ("slot update_slots: id 0 | task 3 | prompt processing",), Cause.CRASHED),
        (1, MISMATCH, Cause.MODEL_ERROR),
        (1, MISSING, Cause.MODEL_ERROR),
        (1, PORT, Cause.PORT_IN_USE),
        (1, BAD_ARG, Cause.BAD_ARGS),
        (SEGV, ("srv  update_slots: all slots are idle",), Cause.CRASHED),
        (ABRT, ("GGML_ASSERT(n_tokens > 0) failed",), Cause.CRASHED),
        (0, ("srv    operator(): operator(): cleaning up before exit...",), Cause.EXITED),
        (1, (), Cause.EXITED),
    ],
)
def test_cause_table(rc: int, lines: tuple[str, ...], cause: Cause) -> None:
    assert classify(Exit(rc, lines)).cause is cause


def test_failed_allocation_size_is_extracted() -> None:
    v = classify(Exit(1, CUDA_LOAD_OOM))
    assert v.alloc_mib == pytest.approx(9986.82)
    assert "cudaMalloc failed" in v.detail


def test_mismatch_detail_names_the_mismatch() -> None:
    assert "mismatch between text model" in classify(Exit(1, MISMATCH)).detail


def test_our_own_signal_is_a_stop_unless_the_log_shows_oom() -> None:
    assert classify(Exit(-signal.SIGTERM, ("all slots are idle",), signalled_by_us=True)).cause is Cause.STOPPED
    assert classify(Exit(KILL, (), signalled_by_us=True)).cause is Cause.STOPPED
    # Metal lives on after an OOM; we kill it, but the log says what really happened.
    assert classify(Exit(-signal.SIGTERM, METAL_OOM, signalled_by_us=True)).cause is Cause.OOM_COMPUTE


def test_a_hung_child_we_killed_keeps_its_cause_for_metrics_and_the_journal() -> None:
    wedged = classify(Exit(KILL, ("srv  update_slots: all slots are idle",), signalled_by_us=True,
                           killed_as=Cause.WEDGED))
    assert wedged.cause is Cause.WEDGED and "SIGKILL" in wedged.detail
    assert classify(Exit(-signal.SIGTERM, (), signalled_by_us=True, killed_as=Cause.UNRESPONSIVE)).cause \
        is Cause.UNRESPONSIVE
    # Out-of-memory lines still win: the hang was the allocation failing.
    assert classify(Exit(KILL, METAL_OOM, signalled_by_us=True, killed_as=Cause.WEDGED)).cause is Cause.OOM_COMPUTE


def test_cgroup_confirms_or_rules_out_host_oom() -> None:
    v = classify(Exit(KILL, (), cgroup_oom_kill=True))
    assert v.cause is Cause.OOM_HOST and "confirmed" in v.detail
    v = classify(Exit(KILL, (), cgroup_oom_kill=False))
    assert v.cause is Cause.CRASHED and "not the OOM killer" in v.detail
    v = classify(Exit(KILL, (), cgroup_oom_kill=None))
    assert v.cause is Cause.CRASHED and "sender unknown" in v.detail and "cannot be read" in v.detail


@pytest.mark.parametrize(
    ("line", "fatal"),
    [
        ("ggml_metal: backend is in error state from a previous command buffer", True),
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: out of memory", False),  # aborts by itself, and is an OOM for the ladder
        ("srv  update_slots: all slots are idle", False),
    ],
)
def test_fatal_lines_while_running(line: str, fatal: bool) -> None:
    assert bool(FATAL_WHILE_RUNNING.search(line)) is fatal
