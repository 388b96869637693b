"""The out-of-memory ladder: evidence-driven layer counts, then context, projector, CPU."""

from __future__ import annotations

from supervisor.core.ladder import Evidence, RunSettings, estimate_layers, next_rung


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
