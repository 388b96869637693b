"""Several GPUs, end to end with the real llama-server: NVML faked as two devices (tests/doubles/fake_nvml.py) and a
stand-in for a CUDA build in front of the real (CPU) server that lists the devices and runs out of memory on one
of them when the test says so (tests/doubles/gpus_llama_server.py). What the supervisor decides, the argv it
passes, and what it does after an out-of-memory exit on one GPU are all real."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from doubles.fake_nvml import FakeDevice, FakeNvml
from doubles.gpus_llama_server import write_gpus_double
from support import running, wait_for

from supervisor.core.estimate import RESERVE_FRACTION, RESERVE_MIB
from supervisor.host import gguf, gpu, room
from supervisor.host.memory import FILE_NAME
from supervisor.spec.loaded import load_checked
from supervisor.spec.profile import ProfileError

LISTING = """Available devices:
  CUDA0: NVIDIA GeForce RTX 3090 (24135 MiB, 23800 MiB free)
  CUDA1: NVIDIA RTX A6000 (48539 MiB, 48200 MiB free)"""
CTX = 1024


def free_for(layers: float, cost: float) -> float:
    """NVML free memory in which `layers` layers of `cost` fit beside the estimate's reserve."""
    return (RESERVE_MIB + layers * cost) / (1 - RESERVE_FRACTION)


class Box:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_server: str, tiny_model: Path) -> None:
        self.nvml = FakeNvml(FakeDevice("NVIDIA GeForce RTX 3090", 24576.0),
                             FakeDevice("NVIDIA RTX A6000", 49152.0)).install(monkeypatch)
        self.fp, self.fp_model = gguf.footprint(tiny_model, ctx_size=CTX), tiny_model
        self.limits, self.record = tmp_path / "limits.json", tmp_path / "starts.jsonl"
        self.binary = write_gpus_double(tmp_path / "llama-server", llama_server, LISTING, self.limits, self.record,
                                        self.fp.n_layers)
        self.nvml.live = self.children  # each running child holds its layers on its GPUs, as NVML would show

    def children(self) -> dict[int, dict[int, float]]:
        out: dict[int, dict[int, float]] = {}
        for start in self.starts():
            if psutil.pid_exists(start["pid"]) and psutil.Process(start["pid"]).status() != psutil.STATUS_ZOMBIE:
                for dev, n in start["layers"].items():
                    out.setdefault(int(dev.removeprefix("CUDA")), {})[start["pid"]] = n * self.cost
        return out

    def free(self, *mib: float) -> None:
        for d, m in zip(self.nvml.devices, mib, strict=True):
            d.other_mib = d.total_mib - m

    @property
    def cost(self) -> float:
        """A layer of the model, its biggest (the output layer counts as one)."""
        return max(self.fp.mean_layer_mib, self.fp.output_mib)

    def layers_fit(self, *n: float) -> None:
        """Room on each GPU for that many of the model's layers."""
        self.free(*(free_for(k, self.cost) for k in n))

    def starts(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.record.read_text().splitlines()] if self.record.exists() else []


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_server: str, tiny_model: Path) -> Box:
    return Box(tmp_path, monkeypatch, llama_server, tiny_model)


# ---- the profile's `gpus` against the box ----------------------------------------------------------------------


def test_gpus_named_are_checked_against_the_box(box: Box, write_profile) -> None:
    assert load_checked(write_profile(binary=str(box.binary), gpus=[1])).profile.gpus == (1,)
    assert load_checked(write_profile(binary=str(box.binary), gpus=[box.nvml.devices[0].uuid])).profile.gpus
    with pytest.raises(ProfileError) as exc:
        load_checked(write_profile(binary=str(box.binary), gpus=[0, 2]))
    (field, msg), = exc.value.problems
    assert field == "gpus" and msg.startswith("GPU 2 is not on this box; GPUs seen: 0 (NVIDIA GeForce RTX 3090, GPU-")
    assert "1 (NVIDIA RTX A6000" in msg and "CUDA1)" in msg


def test_a_build_without_cuda_cannot_be_placed(box: Box, write_profile) -> None:
    with pytest.raises(ProfileError) as exc:
        load_checked(write_profile(gpus=[1]))  # the real server here: a CPU build
    assert exc.value.problems == [("gpus", "GPU 1 (NVIDIA RTX A6000) has no device in this llama-server's "
                                           "--list-devices (none: a build without CUDA): this llama-server lists no "
                                           "CUDA device, so nothing can be placed there")]


def test_no_nvidia_gpu_is_a_validation_error_not_a_traceback(write_profile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_state", {"tried": False, "ok": False, "error": None})  # NVML for real: no driver here
    with pytest.raises(ProfileError) as exc:
        load_checked(write_profile(gpus=[0]))
    (field, msg), = exc.value.problems
    assert field == "gpus" and "GPU 0 named, but this box has no NVIDIA GPU that NVML can see (" in msg
    assert "leave gpus out" in msg
    assert load_checked(write_profile()).profile.gpus == "auto"


# ---- where the runner puts it -----------------------------------------------------------------------------------


async def test_a_model_that_fits_either_gpu_goes_where_it_leaves_least_room(box: Box, tmp_path: Path,
                                                                           write_profile) -> None:
    box.layers_fit(40, 12)  # both hold all 5 layers; GPU 1 is the tighter fit
    async with running(tmp_path, write_profile(binary=str(box.binary), n_gpu_layers="auto")) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        (start,) = box.starts()
        assert start["devices"] == ["CUDA1"] and start["split_mode"] == "none" and start["ngl"] == "auto"
        assert d.default.runner.machine.adjustment is None  # placing is not an adjustment
        assert d.default.runner.machine.effective.placement is not None
        assert d.default.runner.machine.effective.placement.gpus == (1,)


async def test_gpus_1_is_respected(box: Box, tmp_path: Path, write_profile) -> None:
    box.layers_fit(12, 40)  # GPU 0 would be the best fit
    async with running(tmp_path, write_profile(binary=str(box.binary), n_gpu_layers="all", gpus=[1])) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert [s["devices"] for s in box.starts()] == [["CUDA1"]]


async def test_a_model_bigger_than_either_gpu_is_split_in_proportion(box: Box, tmp_path: Path,
                                                                     write_profile) -> None:
    box.layers_fit(2.5, 3.5)  # 5 layers: neither alone, both together
    async with running(tmp_path, write_profile(binary=str(box.binary), n_gpu_layers="auto")) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        (start,) = box.starts()
        assert start["devices"] == ["CUDA0", "CUDA1"] and start["split_mode"] == "layer"
        assert start["tensor_split"] == [2.0, 3.0] and start["ngl"] == "5"
        assert start["layers"] == {"CUDA0": 2, "CUDA1": 3}  # what llama.cpp makes of it


async def test_an_oom_on_one_gpu_moves_the_model_when_the_other_has_room(box: Box, tmp_path: Path,
                                                                         write_profile) -> None:
    box.layers_fit(40, 12)  # best fit GPU 1 ...
    box.limits.write_text(json.dumps({"CUDA1": 0}))  # ... which runs out of memory (something NVML did not show)
    async with running(tmp_path, write_profile(binary=str(box.binary), n_gpu_layers="all"),
                       vram_release_wait_s=0) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert [s["devices"] for s in box.starts()] == [["CUDA1"], ["CUDA0"]]
        m = d.default.runner.machine
        assert m.effective.n_gpu_layers == "all" and m.effective.placement.gpus == (0,)  # type: ignore[union-attr]
        assert "GPU 1 ran out of memory, moved to GPU 0" in (m.adjustment or "")
        # Learned settings remember where it ran.
        await wait_for(lambda: (tmp_path / "state" / FILE_NAME).exists(), what="learned settings")
    learned = json.loads((tmp_path / "state" / FILE_NAME).read_text())
    (entry,) = learned.values()
    assert entry["settings"]["placement"]["gpus"] == [0]


async def test_an_oom_on_one_gpu_of_a_split_lowers_only_that_gpu(box: Box, tmp_path: Path,
                                                                 write_profile) -> None:
    box.layers_fit(2.5, 3.5)
    box.limits.write_text(json.dumps({"CUDA1": 1}))
    async with running(tmp_path, write_profile(binary=str(box.binary), n_gpu_layers="all"),
                       vram_release_wait_s=0) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        layers = [s["layers"] for s in box.starts()]
        assert layers == [{"CUDA0": 2, "CUDA1": 3}, {"CUDA0": 2, "CUDA1": 2}, {"CUDA0": 2, "CUDA1": 1}]
        assert "GPU layers on GPU 1 2 → 1" in (d.default.runner.machine.adjustment or "")
        assert "the others keep theirs (GPU 0 2)" in (d.default.runner.machine.adjustment or "")


async def test_climbing_back_re_places_over_the_gpus(box: Box, tmp_path: Path, write_profile) -> None:
    box.layers_fit(2.5, 3.5)
    box.limits.write_text(json.dumps({"CUDA1": 1}))
    async with running(tmp_path, write_profile(binary=str(box.binary), n_gpu_layers="all"),
                       vram_release_wait_s=0, climb_interval_s=3600) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert d.default.runner.machine.effective.n_gpu_layers == 3
        # The other process on GPU 1 is gone: now all of it fits there alone.
        box.limits.write_text("{}")
        box.layers_fit(2.5, 12)
        assert await d.default.runner.climber.check()
        await wait_for(lambda: d.default.runner.ready and len(box.starts()) == 4, what="ready after the climb")
        last = box.starts()[-1]
        assert last["devices"] == ["CUDA1"] and last["ngl"] == "5"  # all of it (the split at start made it a count)
        assert d.default.runner.machine.effective.placement.gpus == (1,)  # type: ignore[union-attr]
        estimate = d.default.runner.climber.status()["last_check"]["estimate"]
        assert estimate["plan"]["kind"] == "one" and set(estimate["free_mib"]) == {"0", "1"}


def test_what_residency_needs_to_place_a_profile(box: Box, write_profile) -> None:
    loaded = load_checked(write_profile(binary=str(box.binary), gpus=[1], n_gpu_layers=3))
    pl = room.placing(loaded.profile, loaded.caps)
    assert pl is not None and pl.devices == ("CUDA0", "CUDA1") and pl.choice == (1,)
    assert pl.ask.layers == 3 and len(pl.ask.layer_mib) == box.fp.n_layers + 1
    # A profile whose environment picks its GPUs is not placed; neither is one on a binary without CUDA.
    env = load_checked(write_profile(binary=str(box.binary), env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert room.placing(env.profile, env.caps) is None
    cpu = load_checked(write_profile())
    assert room.placing(cpu.profile, cpu.caps) is None


# ---- several models on several GPUs: residency, /plan, /status, /metrics ---------------------------------------


def two_models(box: Box, tmp_path: Path, **b_fields: Any) -> Path:
    folder = tmp_path / "profiles"
    folder.mkdir()
    for name, extra in (("a", {}), ("b", b_fields)):
        data = {"name": name, "binary": str(box.binary), "model": str(box.fp_model), "n_gpu_layers": "all",
                "ctx_size": CTX, "min_ctx_size": 256, "cache_ram_mib": 0, "threads": 1, "parallel": 1, **extra}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder


async def test_two_models_that_each_fit_one_gpu_land_on_different_gpus(box: Box, tmp_path: Path) -> None:
    box.layers_fit(7, 9)  # a goes to GPU 0 (tighter); once it holds it, b only fits GPU 1
    folder = two_models(box, tmp_path)
    async with running(tmp_path, folder / "a.yaml", profiles_dir=folder, admin_key="sesame") as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60, headers={"authorization": "Bearer sesame"}) as c:
        await wait_for(lambda: d.pool.models["a"].measured is not None, what="a ready and measured")
        # Asked first: what loading b would do. Nothing is done.
        plan = (await c.get("/plan", params={"model": "b"})).json()
        assert plan["loaded"] is False and plan["placement"]["gpus"] == [1] and plan["unload"] == []
        assert plan["layers"] == "all" and plan["ctx_size"] == CTX and set(plan["memory"]["gpu_mib"]) == {"1"}
        assert plan["room"]["gpu_free_mib"].keys() == {"0", "1"} and "best fit" in plan["why"]
        assert d.pool.models["b"].loads == 0
        assert (await httpx.AsyncClient(base_url=d.url).get("/plan?model=b")).status_code == 401
        assert (await c.get("/plan", params={"model": "nope"})).status_code == 404
        # The ops page's card of the unloaded b shows the same plan.
        card = next(m for m in (await c.get("/ui/api/overview")).json()["models"] if m["profile"]["name"] == "b")
        assert card["plan"]["placement"]["gpus"] == [1]
        r = await c.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        # Alternating requests: both stay loaded, each on its own GPU; nothing is unloaded.
        for m in ("a", "b") * 3:
            assert (await c.post("/v1/completions", json={"model": m, "prompt": "hi", "max_tokens": 2})).status_code == 200
        assert [s["devices"] for s in box.starts()] == [["CUDA0"], ["CUDA1"]]
        assert d.pool.models["a"].loads == d.pool.models["b"].loads == 1
        st = (await c.get("/status")).json()
        assert [sorted(g["models"]) for g in st["gpus"]] == [["a"], ["b"]]
        assert st["gpus"][0]["others_mib"] > 0 and st["gpus"][1]["uuid"].startswith("GPU-")
        assert (await c.get("/plan", params={"model": "a"})).json()["loaded"] is True
        metrics = (await c.get("/metrics")).text
        assert 'llama_supervisor_child_vram_bytes{gpu="0",model="a"}' in metrics
        assert 'llama_supervisor_child_vram_bytes{gpu="1",model="b"}' in metrics
        assert 'llama_supervisor_gpu_memory_free_bytes{gpu="1",name="NVIDIA RTX A6000"}' in metrics


async def test_room_is_made_on_the_gpu_the_waiting_model_needs(box: Box, tmp_path: Path) -> None:
    box.layers_fit(7, 9)
    folder = two_models(box, tmp_path, gpus=[0])  # b may only use GPU 0, where a sits
    async with running(tmp_path, folder / "a.yaml", profiles_dir=folder) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.pool.models["a"].measured is not None, what="a ready and measured")
        plan = (await c.get("/plan", params={"model": "b"})).json()
        assert plan["unload"] == ["a"] and plan["placement"]["gpus"] == [0]
        r = await c.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        assert [s["devices"] for s in box.starts()] == [["CUDA0"], ["CUDA0"]]
        assert d.pool.models["a"].last_unload["reason"] == "lru"  # type: ignore[index]
