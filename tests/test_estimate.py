"""The VRAM estimate: GGUF sizes written by the tests, NVML faked at the module edge."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import tiny_gguf
from doubles.oom_llama_server import write_double
from support import running, wait_for

from supervisor.core import estimate
from supervisor.core.ladder import Evidence, RunSettings, next_rung
from supervisor.host import gguf, gpu


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf.write_tiny_llama(tmp_path_factory.mktemp("est") / "m.gguf", layers=6, embd=128, heads=4)


def test_footprint_from_gguf(model: Path) -> None:
    fp = gguf.footprint(model, ctx_size=4096)
    assert fp.n_layers == 6 and len(set(fp.layer_mib)) == 1
    # 4 attention matrices + 3 FFN matrices (ff = 2 × embd), f32, plus two norms.
    expected = (4 * 128 * 128 + 3 * 128 * 256 + 2 * 128) * 4 / 2**20
    assert fp.layer_mib[0] == pytest.approx(expected)
    assert fp.kv_mib_per_layer == pytest.approx(4096 * 4 * 32 * (2 + 2) / 2**20)  # f16 K and V
    q8 = gguf.footprint(model, ctx_size=4096, cache_type_k="q8_0", cache_type_v="q8_0")
    assert q8.kv_mib_per_layer == pytest.approx(fp.kv_mib_per_layer * 34 / 64)
    assert fp.output_mib > 0 and fp.mmproj_mib == 0


def test_reader_agrees_with_the_gguf_package(model: Path, tmp_path: Path) -> None:
    # The daemon's own struct reader against llama.cpp's Python package, on a mixed-type model (f16 + q8_0).
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    mixed = tmp_path / "mixed.gguf"
    w = GGUFWriter(str(mixed), "llama")
    rng = np.random.default_rng(0)
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    q8 = quantize(rng.standard_normal((64, 256)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path in (model, mixed):
        ours = {t.name: t.n_bytes for t in gguf.read_header(path, tensors=True).tensors}
        theirs = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
        assert ours == theirs
    assert gguf.block_count(model) == 6
    assert gguf.block_count(tmp_path / "missing.gguf") is None


def test_check_gguf_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(10))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf.check_gguf(bad)
    with pytest.raises(ValueError, match="file not found"):
        gguf.check_gguf(tmp_path / "none.gguf")


def test_fit_layers_counts_blocks_then_output(model: Path) -> None:
    fp = gguf.footprint(model, ctx_size=4096)
    cost = fp.layer_cost(0)
    assert estimate.fit_layers(fp, 10_000, reserve_mib=10_000 - 2.5 * cost).layers == 2
    assert estimate.fit_layers(fp, 10_000, reserve_mib=0).layers == 7  # all blocks and the output
    assert estimate.fit_layers(fp, 100, reserve_mib=200).layers == 0
    e = estimate.fit_layers(fp, 5000)
    assert e.reserve_mib == pytest.approx(768 + 250) and "5000 MiB free" in e.describe()


def test_ladder_uses_footprint_and_compute_failure(model: Path) -> None:
    fp = gguf.footprint(model, ctx_size=4096)
    free = (768 + 4.5 * fp.layer_cost(0)) / 0.95  # room for 4 layers beside the reserve
    ev = Evidence(alloc_mib=None, free_vram_mib=free, model_layers=6, footprint=fp)
    rung = next_rung(RunSettings(7, 4096), ev, min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.settings.n_gpu_layers == 4 and "MiB a layer" in rung.reason
    # A failed compute buffer grows the reserve: fewer layers next time.
    ev = Evidence(alloc_mib=2 * fp.layer_cost(0) + 300, free_vram_mib=free, model_layers=6, footprint=fp, compute=True)
    rung = next_rung(RunSettings(7, 4096), ev, min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.settings.n_gpu_layers < 4 and "compute buffer failed" in rung.reason


def fake_gpu(free_mib: float) -> list[gpu.GpuInfo]:
    return [gpu.GpuInfo(0, "Fake GPU 24GB", 24576.0, 24576.0 - free_mib, free_mib, 0.0, 40.0, ())]


@pytest.mark.parametrize("estimate_on", [True, False])
async def test_pre_launch_estimate_with_fake_nvml(tmp_path: Path, write_profile, llama_server: str,
                                                 tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                 estimate_on: bool) -> None:
    fp = gguf.footprint(tiny_model, ctx_size=1024)
    free = (768 + 2.5 * fp.layer_cost(0)) / 0.95  # two of the tiny model's layers fit beside the reserve
    monkeypatch.setattr(gpu, "snapshot", lambda: fake_gpu(free))
    record = tmp_path / "layers.txt"
    double = write_double(tmp_path / "llama-server", llama_server, limit=1, mode="load", record=record)
    profile = write_profile(binary=str(double), n_gpu_layers=99)
    async with running(tmp_path, profile, estimate_vram=estimate_on, vram_release_wait_s=0) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        tried = record.read_text().split()
        st = (await c.get("/status")).json()
    if estimate_on:
        assert tried == ["2", "1"]  # the estimate, then one ladder step (the double fails above 1)
        assert st["settings"]["vram_estimate"]["layers"] == 2
        assert st["gpus"][0]["name"] == "Fake GPU 24GB"
    else:
        assert tried == ["99", "2", "1"]  # 99 fails; the ladder's estimate from the evidence gives 2; the double wants ≤ 1
        assert st["settings"]["vram_estimate"] is None


def test_check_prints_the_estimate_with_fake_nvml(write_profile, tiny_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.cli import _estimate_line
    from supervisor.spec.profile import load_profile

    monkeypatch.setattr(gpu, "snapshot", lambda: fake_gpu(769.0))
    line = _estimate_line(load_profile(write_profile(n_gpu_layers=99)))
    assert "Fake GPU 24GB, 769 MiB free" in line and "asks for 5: would start with" in line
    monkeypatch.setattr(gpu, "snapshot", lambda: fake_gpu(20000.0))
    assert _estimate_line(load_profile(write_profile(n_gpu_layers="all"))).endswith("fits as asked")
    assert "fits 'auto' itself" in _estimate_line(load_profile(write_profile(n_gpu_layers="auto")))
