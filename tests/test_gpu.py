"""host/gpu.py over a faked NVML of two devices (tests/doubles/fake_nvml.py: pynvml's own names, shapes, errors)."""

from __future__ import annotations

import os

import pytest
from doubles.fake_nvml import FakeDevice, FakeNvml, two_gpus

from supervisor.host import gpu, room


def test_every_device_with_its_memory_and_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus(free0=20000, free1=40000).install(monkeypatch)
    nvml.devices[1].processes[4242] = 3000.0
    gpus = gpu.snapshot()
    assert [(g.index, g.name) for g in gpus] == [(0, "NVIDIA GeForce RTX 3090"), (1, "NVIDIA RTX A6000")]
    assert gpus[0].uuid.startswith("GPU-") and gpus[0].uuid != gpus[1].uuid
    assert gpus[0].memory_total_mib == 24576 and gpus[0].memory_free_mib == pytest.approx(20000)
    assert gpus[1].memory_free_mib == pytest.approx(37000) and gpus[1].processes == ((4242, 3000.0),)
    d = gpus[1].as_dict()
    assert d["uuid"] == gpus[1].uuid and d["processes"] == [{"pid": 4242, "memory_mib": 3000.0}]
    assert gpu.unavailable_reason() is None


def test_a_childs_vram_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus().install(monkeypatch)
    me = os.getpid()
    assert gpu.held_by(me) == ()
    nvml.devices[1].processes[me] = 1500.0
    assert gpu.held_by(me) == (0.0, 1500.0)  # by NVML index: nothing on GPU 0
    nvml.devices[0].processes[me] = 700.0
    nvml.devices[0].processes[me + 1] = 900.0  # someone else's
    assert gpu.held_by(me) == (700.0, 1500.0)
    mem = room.measure(me)
    assert mem is not None and mem.gpu_mib == (700.0, 1500.0) and mem.host_mib > 0


def test_a_lost_gpu_keeps_the_others_at_their_nvml_index(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(FakeDevice("A", 8192), FakeDevice("B", 8192), FakeDevice("C", 8192)).install(monkeypatch)
    nvml.devices[0].lost = True
    nvml.devices[2].processes[77] = 100.0
    gpus = gpu.snapshot()
    assert [g.index for g in gpus] == [1, 2]
    assert gpu.held_by(77, gpus) == (0.0, 0.0, 100.0)
    assert room.room(None).gpu_free_mib == (0.0, 8192.0, 8092.0)


def test_unknown_process_memory_counts_as_none_held(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus().install(monkeypatch)
    nvml.devices[0].processes[5] = -1  # NVML_VALUE_NOT_AVAILABLE: pynvml gives None
    assert gpu.snapshot()[0].processes == ((5, 0.0),)


def test_no_driver_library_means_no_gpus_and_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(gpu, "_state", {"tried": False, "ok": False, "error": None})
    monkeypatch.setattr(gpu, "_driver_library", missing)
    assert gpu.snapshot() == [] and gpu.held_by(1) == ()
    assert "libnvidia-ml.so.1" in (gpu.unavailable_reason() or "")
