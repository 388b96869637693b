"""Profile + binary capabilities + run settings → llama-server argv and environment. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from .capabilities import Capabilities
from .ladder import RunSettings


class ChildSpec(Protocol):
    """What the command line is built from: the profile's fields that reach llama-server (spec/profile.py's
    Profile has them all; a protocol, so core stays free of the schema that imports it back)."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> object: ...  # a path: only its str() reaches the command line
    @property
    def mmproj(self) -> object | None: ...
    @property
    def metal(self) -> bool | None: ...
    @property
    def threads(self) -> int | None: ...
    @property
    def parallel(self) -> int | None: ...
    @property
    def flash_attn(self) -> str | None: ...
    @property
    def cache_type_k(self) -> str | None: ...
    @property
    def cache_type_v(self) -> str | None: ...
    @property
    def cache_ram_mib(self) -> int: ...
    @property
    def extra_args(self) -> Sequence[str]: ...
    @property
    def env(self) -> Mapping[str, str]: ...

CHILD_HOST = "127.0.0.1"

# Flags the builder sets from profile fields; extra_args may not set them behind its back.
RESERVED_FLAGS: dict[str, str] = {
    "-m": "model", "--model": "model",
    "-mm": "mmproj", "--mmproj": "mmproj", "--no-mmproj-offload": "mmproj (the ladder decides)",
    "--host": "(always loopback)", "--port": "port",
    "-c": "ctx_size", "--ctx-size": "ctx_size",
    "-ngl": "n_gpu_layers", "--gpu-layers": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers",
    "-dev": "gpus (or n_gpu_layers / metal)", "--device": "gpus (or n_gpu_layers / metal)",
    "-sm": "gpus", "--split-mode": "gpus", "-ts": "gpus", "--tensor-split": "gpus", "-mg": "gpus", "--main-gpu": "gpus",
    "-t": "threads", "--threads": "threads",
    "-np": "parallel", "--parallel": "parallel",
    "-fa": "flash_attn", "--flash-attn": "flash_attn",
    "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v", "--cache-type-v": "cache_type_v",
    "-cram": "cache_ram_mib", "--cache-ram": "cache_ram_mib",
    "--metrics": "(always on)",
}

# Flags that blog posts and old guides use but llama-server does not (or no longer) have.
REPLACEMENTS: dict[str, str] = {
    "--metal": "there is no --metal flag: Metal is built in on macOS; set `metal: true` (or n_gpu_layers) in the profile",
    "--memory-f16": "removed long ago: the KV cache is f16 by default; use cache_type_k / cache_type_v",
    "--mlock": "replaced by --load-mode mlock (or mmap+mlock)",
    "--no-mmap": "replaced by --load-mode (e.g. --load-mode read)",
    "--gpu": "no such flag: use n_gpu_layers in the profile",
}

# Inherited variables that would silently change the child, unless the profile sets them itself.
# LLAMA_SUPERVISOR_* carries the supervisor's own settings, keys included; AIP_* switches llama-server into Google
# Cloud's prediction mode (another port, another /predict route).
_STRIPPED_ENV_PREFIXES = ("LLAMA_ARG_", "LLAMA_SUPERVISOR_", "AIP_")
_STRIPPED_ENV = frozenset({"LLAMA_API_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                           "LISTEN_PID", "LISTEN_FDNAMES"})


# Every child, and the probe that reads --list-devices, numbers CUDA devices in NVML's order (PCI bus id) instead of
# CUDA's default fastest-first: that is what lets a "CUDAk" be matched to an NVML GPU (core/placement.py).
GPU_ORDER_ENV = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
# Variables with which a profile chooses GPUs behind the supervisor's back: with them, it does not place the model.
GPU_CHOICE_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


class CommandError(Exception):
    """The profile asks for something this binary cannot do."""


def check_extra_args(args: Sequence[str], caps: Capabilities) -> None:
    """Reject flags the binary does not know, naming the replacement where one is known."""
    expect_value = False
    for i, arg in enumerate(args):
        flag, has_inline_value = arg.split("=", 1)[0], "=" in arg
        is_flag = arg.startswith("-") and not _is_number(arg)
        if expect_value and not is_flag:
            expect_value = False
            continue
        if not is_flag:
            prev = args[i - 1] if i else ""
            hint = (f": {prev} takes no value (booleans are just the flag)" if prev.startswith("-")
                    else ": stray value, not a flag")
            raise CommandError(f"extra_args: '{arg}'{hint}")
        if flag not in caps.flags:
            why = REPLACEMENTS.get(flag, f"{caps.binary} does not know this flag (see its --help)")
            raise CommandError(f"extra_args: unknown flag {flag}: {why}")
        expect_value = flag in caps.value_flags and not has_inline_value
    if expect_value:
        raise CommandError(f"extra_args: {args[-1]} needs a value")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _layers_arg(settings: RunSettings, caps: Capabilities) -> str:
    if settings.placement is not None and settings.placement.split:
        # A tensor split is the layer count on each GPU (llama-server's own fitting gives up on one it did not make).
        return str(sum(settings.placement.split))
    layers = settings.n_gpu_layers
    if isinstance(layers, int):
        return str(layers)
    if caps.ngl_auto:
        return layers
    if layers == "all":
        return "999"  # older builds take integers only; more than any model has means all
    raise CommandError("n_gpu_layers: 'auto' needs a newer llama-server (this one takes integers only)")


def _placement_args(settings: RunSettings, caps: Capabilities) -> list[str]:
    """--device with the GPUs chosen; over several, each one's layers; on one, the whole model there."""
    p = settings.placement
    assert p is not None
    args = ["--device", ",".join(p.devices)]
    if len(p.devices) > 1:
        args += ["--split-mode", "layer"] + (["--tensor-split", ",".join(map(str, p.split))] if p.split else [])
    else:
        args += ["--split-mode", "none", "--main-gpu", "0"]  # index 0 of the --device list: the one chosen
    for flag in args[::2]:
        if not caps.has(flag):
            raise CommandError(f"gpus: {flag} is not supported by {caps.binary} (needed to place the model on "
                               f"{p.describe()})")
    return args


def build_argv(profile: ChildSpec, caps: Capabilities, settings: RunSettings, port: int) -> list[str]:
    """The exact command line; raises CommandError when the binary lacks something the profile needs."""
    argv = [caps.binary, "--model", str(profile.model), "--host", CHILD_HOST, "--port", str(port),
            "--ctx-size", str(settings.ctx_size)]
    # `metal: false` on a Mac (the binary lists a Metal device) means CPU only: Metal is otherwise the default.
    metal_off = profile.metal is False and caps.has_metal
    if settings.cpu_only or metal_off:
        argv += ["--n-gpu-layers", "0"]
        if caps.has("--device"):
            argv += ["--device", "none"]
    else:
        argv += ["--n-gpu-layers", _layers_arg(settings, caps)]
        if settings.placement is not None:
            argv += _placement_args(settings, caps)
    if profile.mmproj is not None:
        argv += ["--mmproj", str(profile.mmproj)]
        if not settings.mmproj_offload or settings.cpu_only:
            argv.append("--no-mmproj-offload")
    optional = [
        ("--threads", profile.threads), ("--parallel", profile.parallel), ("--flash-attn", profile.flash_attn),
        ("--cache-type-k", profile.cache_type_k), ("--cache-type-v", profile.cache_type_v),
    ]
    for flag, value in optional:
        if value is not None:
            if not caps.has(flag):
                raise CommandError(f"{flag}: not supported by {caps.binary}")
            argv += [flag, str(value)]
    if caps.has("--cache-ram"):
        argv += ["--cache-ram", str(profile.cache_ram_mib)]
    if caps.has("--alias"):
        argv += ["--alias", profile.name]
    if caps.has("--metrics"):
        argv.append("--metrics")
    check_extra_args(profile.extra_args, caps)
    return argv + list(profile.extra_args)


def child_env(parent: Mapping[str, str], profile: ChildSpec) -> dict[str, str]:
    """The child's environment, built on purpose: stray LLAMA_ARG_* would silently change llama-server."""
    env = {k: v for k, v in parent.items()
           if not k.startswith(_STRIPPED_ENV_PREFIXES) and k not in _STRIPPED_ENV}
    if not any(k in profile.env for k in GPU_CHOICE_ENV):
        env.update(GPU_ORDER_ENV)  # a profile that picks its GPUs itself keeps CUDA's numbering as it meant it
    env.update(profile.env)
    return env


def redact(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--api-key", "--hf-token", "-hft"):
            out[i + 1] = "***"
    return [a.split("=", 1)[0] + "=***" if a.startswith(("--api-key=", "--hf-token=")) else a for a in out]
