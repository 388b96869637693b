"""GPU facts from NVML (nvidia-ml-py): every device (index, UUID, name, memory) and what each process holds
on it. No driver, no GPU or no library → empty answers, never an error.

NVML numbers devices by PCI bus id; that is the index a profile's `gpus:` names and the one every per-GPU
figure here is keyed by (core/placement.py maps it to llama-server's device names)."""

from __future__ import annotations

import ctypes
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ok": False, "error": None}
MIB = 2**20


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: float
    memory_used_mib: float
    memory_free_mib: float
    utilization_pct: float | None
    temperature_c: float | None
    processes: tuple[tuple[int, float], ...] = ()  # (pid, MiB) of compute processes
    uuid: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["processes"] = [{"pid": p, "memory_mib": m} for p, m in self.processes]
        return d

    def held_by(self, pid: int) -> float:
        """MiB that process `pid` holds on this GPU (0 when it holds nothing here)."""
        return sum(m for p, m in self.processes if p == pid)


def _driver_library() -> None:
    """Raises OSError where the NVIDIA driver's NVML library is absent."""
    if sys.platform.startswith("linux"):
        # The driver's library is what pynvml loads first: where it is absent (a CPU-only machine), pynvml
        # could only fail. Looking first keeps the binding out of the process there (14 ms and 2.7 MB resident).
        ctypes.CDLL("libnvidia-ml.so.1")


def _init() -> bool:
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _driver_library()
                import pynvml

                pynvml.nvmlInit()
                _state["ok"] = True
            except Exception as exc:  # noqa: BLE001 - any NVML failure means "no GPU info"
                _state["error"] = f"{type(exc).__name__}: {exc}"
        return bool(_state["ok"])


def unavailable_reason() -> str | None:
    return None if _init() else str(_state["error"] or "NVML not available")


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str; older bindings returned bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def snapshot() -> list[GpuInfo]:
    """Every GPU NVML sees, by NVML index. Blocking (NVML calls): use asyncio.to_thread from the event loop."""
    if not _init():
        return []
    import pynvml

    out = []
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        return []
    for i in range(count):
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = _text(pynvml.nvmlDeviceGetName(h))
        except pynvml.NVMLError:
            continue  # a GPU that fell off the bus (or is being reset) is not there to place a model on
        uuid = ""
        try:
            uuid = _text(pynvml.nvmlDeviceGetUUID(h))
        except pynvml.NVMLError:
            pass
        util = temp = None
        try:
            util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            temp = float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        except pynvml.NVMLError:
            pass
        procs: tuple[tuple[int, float], ...] = ()
        try:
            # usedGpuMemory is None where the driver cannot tell (NVML_VALUE_NOT_AVAILABLE, e.g. on Windows WDDM).
            procs = tuple((p.pid, (p.usedGpuMemory or 0) / MIB)
                          for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h))
        except pynvml.NVMLError:
            pass
        out.append(GpuInfo(i, name, mem.total / MIB, mem.used / MIB, mem.free / MIB, util, temp, procs, uuid))
    return out


def held_by(pid: int, gpus: list[GpuInfo] | None = None) -> tuple[float, ...]:
    """What process `pid` holds on each GPU, by NVML index (trailing GPUs where it holds nothing dropped).
    Blocking unless `gpus` is given."""
    return by_index({g.index: round(g.held_by(pid), 1) for g in (snapshot() if gpus is None else gpus)})


def by_index(values: dict[int, float]) -> tuple[float, ...]:
    """A per-GPU tuple indexed by NVML index (a GPU NVML could not read counts 0), trailing zeros dropped."""
    out = [values.get(i, 0.0) for i in range(max(values, default=-1) + 1)]
    while out and out[-1] == 0:
        out.pop()
    return tuple(out)
