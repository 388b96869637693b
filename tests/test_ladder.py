"""The out-of-memory ladder: evidence-driven layer counts, then context, projector, CPU; per GPU on several."""

from __future__ import annotations

import pytest
from doubles.fake_nvml import two_gpus

from supervisor.core.capabilities import Capabilities, parse_listing
from supervisor.core.estimate import Footprint
from supervisor.core.ladder import Evidence, RunSettings, estimate_layers, next_rung
from supervisor.core.placement import Placement
from supervisor.host import devices, gpu


def walk(start: RunSettings, ev: Evidence, *, min_ctx: int = 1024, has_mmproj: bool = True) -> list[tuple[str, RunSettings]]:
    steps, cur = [], start
    while (rung := next_rung(cur, ev, min_ctx=min_ctx, has_mmproj=has_mmproj)) is not None:
        steps.append((rung.step, rung.settings))
        cur = rung.settings
        assert len(steps) < 50
    return steps


def test_without_figures_halves_then_context_then_projector_then_cpu() -> None:
    steps = walk(RunSettings(99, 4096), Evidence(model_layers=24))
    assert [s.n_gpu_layers for k, s in steps if k == "gpu_layers"] == [12, 6, 3, 1]
    assert [s.ctx_size for k, s in steps if k == "ctx_size"] == [2048, 1024]
    kinds = [k for k, _ in steps]
    assert kinds[-2:] == ["mmproj_cpu", "cpu_only"]
    assert steps[-1][1] == RunSettings(0, 1024, mmproj_offload=False, cpu_only=True)


def test_estimate_from_failed_allocation_and_free_vram() -> None:
    # The measured H100 case: 9986.82 MiB failed for 25 offloadable layers, 5.5 GB free.
    ev = Evidence(alloc_mib=9986.82, free_vram_mib=5632, model_layers=24)
    rung = next_rung(RunSettings(99, 4096), ev, min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.step == "gpu_layers"
    assert rung.settings.n_gpu_layers == estimate_layers(25, ev) == 11
    assert "estimate" in rung.reason


def test_estimate_never_goes_up() -> None:
    ev = Evidence(alloc_mib=100, free_vram_mib=80000, model_layers=24)
    rung = next_rung(RunSettings(8, 4096), ev, min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.settings.n_gpu_layers == 7


def test_auto_becomes_explicit_layers() -> None:
    rung = next_rung(RunSettings("auto", 4096), Evidence(model_layers=4), min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.settings.n_gpu_layers == 2


def test_unknown_model_size_halves_the_number_asked() -> None:
    rung = next_rung(RunSettings(40, 4096), Evidence(), min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.settings.n_gpu_layers == 20


def test_exhausted() -> None:
    assert next_rung(RunSettings(0, 512, False, True), Evidence(), min_ctx=512, has_mmproj=True) is None


def test_no_projector_skips_that_step() -> None:
    kinds = [k for k, _ in walk(RunSettings(1, 1024), Evidence(), has_mmproj=False)]
    assert kinds == ["cpu_only"]


# ---- several GPUs: the evidence's room per GPU comes from a faked NVML of two devices ----------------------------

LISTING = parse_listing("  CUDA0: NVIDIA GeForce RTX 3090 (24135 MiB, 1 MiB free)\n"
                        "  CUDA1: NVIDIA RTX A6000 (48539 MiB, 1 MiB free)\n")
FP = Footprint(n_layers=40, layer_mib=(400.0,) * 40, output_mib=600.0, kv_mib_per_layer=100.0, mmproj_mib=0.0)
ON0 = Placement((0,), ("CUDA0",), (), ("u0",))
SPLIT = Placement((0, 1), ("CUDA0", "CUDA1"), (15, 26), ("u0", "u1"))


def room_after(monkeypatch: pytest.MonkeyPatch, free0: float, free1: float) -> tuple:
    """NVML's room after the exit, read by host/ as on a real box, with llama-server's names matched."""
    two_gpus(free0=free0, free1=free1).install(monkeypatch)
    gpus, why = devices.named(_caps(), gpu.snapshot())
    assert why is None
    return tuple(gpus)


def _caps() -> Capabilities:  # only the listing matters to the matching
    return Capabilities("llama-server", "x", frozenset(), frozenset(), True, ("CUDA0", "CUDA1"), tuple(LISTING))


# (name, settings, free per GPU after the exit, the GPU that ran out, GPUs that ran out before, step, result)
PER_GPU = [
    ("the other GPU has room for all of it: moved, layers untouched", RunSettings("all", 4096, placement=ON0),
     (9000, 40000), 0, frozenset(), "placement", ("all", (1,), ())),
    ("no other GPU has room: fewer layers on the one it ran on", RunSettings("all", 4096, placement=ON0),
     (9000, 3000), 0, frozenset(), "gpu_layers", (15, (0,), ())),
    ("a split that ran out on GPU 1: only GPU 1 loses layers", RunSettings(41, 4096, placement=SPLIT),
     (9000, 9000), 1, frozenset(), "gpu_layers", (30, (0, 1), (15, 15))),
    ("a split, moved whole onto a GPU that now has room", RunSettings(41, 4096, placement=SPLIT),
     (9000, 40000), 0, frozenset(), "placement", (41, (1,), ())),
    ("a GPU that ran out before in this series is not moved back to", RunSettings("all", 4096, placement=ON0),
     (9000, 40000), 0, frozenset({1}), "gpu_layers", (15, (0,), ())),
    ("the log names no GPU: a one-GPU placement is that GPU", RunSettings("all", 4096, placement=ON0),
     (9000, 40000), None, frozenset(), "placement", ("all", (1,), ())),
]


@pytest.mark.parametrize(("cur", "free", "ran_out", "avoid", "step", "result"), [c[1:] for c in PER_GPU],
                         ids=[c[0] for c in PER_GPU])
def test_ladder_per_gpu(monkeypatch: pytest.MonkeyPatch, cur: RunSettings, free: tuple[float, float],
                        ran_out: int | None, avoid: frozenset[int], step: str, result: tuple) -> None:
    gpus = room_after(monkeypatch, *free)
    at = ran_out if ran_out is not None else 0
    ev = Evidence(alloc_mib=9000.0, free_vram_mib=free[at], model_layers=40, footprint=FP, gpus=gpus,
                  ran_out=ran_out, avoid=avoid)
    rung = next_rung(cur, ev, min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.step == step, rung
    s = rung.settings
    assert s.placement is not None
    assert (s.n_gpu_layers, s.placement.gpus, s.placement.split) == result, rung.reason
    assert s.ctx_size == 4096


def test_the_placement_the_child_ran_with_is_what_the_ladder_lowers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings without a placement (the driver placed the child at its spawn): the evidence carries it."""
    gpus = room_after(monkeypatch, 9000, 3000)
    ev = Evidence(free_vram_mib=9000, model_layers=40, footprint=FP, gpus=gpus, ran_out=0, placement=ON0)
    rung = next_rung(RunSettings("all", 4096), ev, min_ctx=1024, has_mmproj=False)
    assert rung is not None and rung.settings.placement == ON0 and rung.settings.n_gpu_layers == 15
