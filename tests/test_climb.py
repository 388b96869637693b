"""Climbing back after the out-of-memory ladder, with the out-of-memory double and a faked NVML (the free VRAM
changes between starts) and the real llama-server behind the double. The GPU proof is scripts/gpu/climb_proof.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from doubles.oom_llama_server import write_double
from support import metric, running, wait_for
from test_reliability import FakeGpu

import supervisor.child.vram as vram_module
from supervisor.core.estimate import Footprint
from supervisor.host import gpu

# 416 MiB a block, like the double's and the H100 proof's model; the tiny model really has 4 blocks.
FOOTPRINT = Footprint(n_layers=4, layer_mib=(416.0,) * 4, output_mib=100.0, kv_mib_per_layer=0.0, mmproj_mib=0.0)
TIGHT_MIB = 1800.0  # 2 layers fit (768 MiB + 5 % reserved)
ROOMY_MIB = 20000.0  # everything fits


@pytest.fixture
def fake_vram(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    fake = FakeGpu(TIGHT_MIB)
    monkeypatch.setattr(gpu, "snapshot", fake.snapshot)
    monkeypatch.setattr(vram_module, "footprint", lambda *_args, **_kw: FOOTPRINT)
    return fake


def layers(record: Path) -> list[str]:
    return record.read_text().split()


def double_with_limit(tmp_path: Path, llama_server: str, limit: int) -> tuple[Path, Path, Path]:
    """The OOM double reading its layer limit from a file at every start: (binary, record, limit file)."""
    record, limit_file = tmp_path / "layers.txt", tmp_path / "limit.txt"
    limit_file.write_text(str(limit))
    return write_double(tmp_path / "llama-server", llama_server, limit=limit_file, mode="load", record=record), \
        record, limit_file


async def test_climbs_back_while_idle_when_vram_frees_up(tmp_path: Path, write_profile, llama_server: str,
                                                        fake_vram: FakeGpu) -> None:
    double, record, limit = double_with_limit(tmp_path, llama_server, 2)
    async with running(tmp_path, write_profile(binary=str(double), n_gpu_layers=99), climb_interval_s=0.3) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready on the estimate")
        assert layers(record) == ["2"]
        await wait_for(lambda: d.default.runner.machine.gen == 1 and d.default.runner.climber.status()["last_check"] is not None,
                       what="a climb check that finds nothing to gain")
        assert d.default.runner.machine.gen == 1
        # The VRAM hog goes away.
        fake_vram.free_mib = ROOMY_MIB
        limit.write_text("99")
        await wait_for(lambda: d.default.runner.ready and d.default.runner.machine.effective.n_gpu_layers == 99, what="climbed")
        assert layers(record) == ["2", "99"]
        st = (await c.get("/status")).json()
        assert st["settings"]["effective"]["n_gpu_layers"] == 99 and st["settings"]["adjustment"] is None
        assert st["settings"]["climb"]["last_check"]["climb_to"]["n_gpu_layers"] == 99
        assert any(t["cause"] == "stopped" and t["detail"].startswith("climb: 2 GPU layers")
                   for t in st["transitions"])
        assert metric((await c.get("/metrics")).text, "climbs_total") == 1.0
        assert (await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 4})).status_code == 200


async def test_a_climb_that_runs_out_of_memory_steps_back_and_waits(tmp_path: Path, write_profile,
                                                                    llama_server: str, fake_vram: FakeGpu) -> None:
    double, record, _limit = double_with_limit(tmp_path, llama_server, 2)
    async with running(tmp_path, write_profile(binary=str(double), n_gpu_layers=99), climb_interval_s=0.3) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready on the estimate")
        fake_vram.free_mib = ROOMY_MIB  # NVML says there is room, but the GPU still cannot take more than 2
        await wait_for(lambda: len(layers(record)) == 3 and d.default.runner.ready, what="climb, OOM, back")
        assert layers(record) == ["2", "99", "2"]
        m = d.default.runner.machine
        assert m.effective.n_gpu_layers == 2 and m.climb_failed is not None and m.failures == ()
        await asyncio.sleep(1.5)  # several climb intervals: no new try while the failure is remembered
        assert layers(record) == ["2", "99", "2"]
        st = (await c.get("/status")).json()
        assert st["settings"]["climb"]["failed_climb"]["settings"]["n_gpu_layers"] == 99
        assert "ran out of memory" in st["settings"]["adjustment"]


async def test_learned_low_count_climbs_at_the_next_start(tmp_path: Path, write_profile, llama_server: str,
                                                         fake_vram: FakeGpu) -> None:
    double, record, limit = double_with_limit(tmp_path, llama_server, 2)
    profile = write_profile(binary=str(double), n_gpu_layers=99)
    async with running(tmp_path, profile, estimate_vram=False, climb="off") as d:
        await wait_for(lambda: d.default.runner.ready, what="ready after the ladder")
        assert d.default.runner.machine.effective.n_gpu_layers == 2  # learned: 99 failed, the estimate said 2
    assert layers(record) == ["99", "2"]
    # Next start (a reboot, say): the VRAM hog is gone.
    fake_vram.free_mib = ROOMY_MIB
    limit.write_text("99")
    # With climbing off, the learned count is used as it is.
    record.write_text("")
    async with running(tmp_path, profile, estimate_vram=False, climb="off") as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert "resumed" in (d.default.runner.machine.adjustment or "")
    assert layers(record) == ["2"]
    # With climbing on (the default), re-estimated against the VRAM free now: the profile's 99.
    record.write_text("")
    async with running(tmp_path, profile, estimate_vram=False) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert layers(record) == ["99"]
        assert d.default.runner.machine.adjustment is None
