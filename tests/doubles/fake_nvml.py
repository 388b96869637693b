"""NVML for tests on a machine without NVIDIA GPUs: the pynvml functions host/gpu.py calls, with the same names,
return shapes (ctypes structures, friendly process objects, str names) and exceptions (NVMLError subclasses by
code), over devices whose memory and processes a test sets. Only what a machine without a GPU cannot produce
is faked; host/gpu.py runs unchanged on top of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pynvml
import pytest

from supervisor.host import gpu

MIB = 2**20


@dataclass
class FakeDevice:
    name: str
    total_mib: float
    other_mib: float = 0.0  # held by processes NVML does not list to us (another container, the display)
    processes: dict[int, float] = field(default_factory=dict)  # pid → MiB
    uuid: str = ""
    lost: bool = False  # fell off the bus: every query fails with GPU_IS_LOST


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    def __init__(self, *devices: FakeDevice) -> None:
        self.devices = list(devices)
        # More processes, asked at every call: {NVML index: {pid: MiB}} (children a test double says it started).
        self.live: Callable[[], dict[int, dict[int, float]]] = dict
        for i, d in enumerate(self.devices):
            if not d.uuid:
                d.uuid = f"GPU-{i:08x}-1111-2222-3333-{i:012x}"
        self.initialized = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        monkeypatch.setattr(gpu, "_state", {"tried": False, "ok": False, "error": None})
        monkeypatch.setattr(gpu, "_driver_library", lambda: None)
        for name in ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMemoryInfo",
                     "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetUtilizationRates",
                     "nvmlDeviceGetTemperature", "nvmlDeviceGetComputeRunningProcesses"):
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    # ---- pynvml's surface ----------------------------------------------------------------------

    def _check(self) -> None:
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: object) -> FakeDevice:
        self._check()
        if not isinstance(handle, _Handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        d = self.devices[handle.index]
        if d.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return d

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def _processes(self, handle: _Handle, d: FakeDevice) -> dict[int, float]:
        return {**d.processes, **self.live().get(handle.index, {})}

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> pynvml.c_nvmlMemory_t:
        d = self._device(handle)
        used = d.other_mib + sum(max(0.0, m) for m in self._processes(handle, d).values())  # type: ignore[arg-type]
        free = max(0.0, d.total_mib - used)
        return pynvml.c_nvmlMemory_t(total=int(d.total_mib * MIB), free=int(free * MIB), used=int(used * MIB))

    def nvmlDeviceGetName(self, handle: object) -> str:
        return self._device(handle).name

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return self._device(handle).uuid

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> pynvml.c_nvmlUtilization_t:
        self._device(handle)
        return pynvml.c_nvmlUtilization_t(gpu=0, memory=0)

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:
        self._device(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return 35

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[object]:
        d = self._device(handle)
        out = []
        for pid, mib in self._processes(handle, d).items():  # type: ignore[arg-type]
            obj = pynvml.nvmlStructToFriendlyObject(pynvml.c_nvmlProcessInfo_t(pid=pid, usedGpuMemory=int(mib * MIB)))
            if mib < 0:  # a test's way to say "not available" (WDDM): pynvml hands None
                obj.usedGpuMemory = None
            out.append(obj)
        return out


def two_gpus(free0: float = 20000.0, free1: float = 40000.0, total0: float = 24576.0,
             total1: float = 49152.0) -> FakeNvml:
    """A 24 GB card beside a 48 GB one, with the free room the test asks for."""
    return FakeNvml(FakeDevice("NVIDIA GeForce RTX 3090", total0, other_mib=total0 - free0),
                    FakeDevice("NVIDIA RTX A6000", total1, other_mib=total1 - free1))
