"""Residency per GPU, as tables: the room comes from a faked NVML of two devices (host/room.py reads it as on a
real box); what a loaded model holds is where NVML shows its process. Unloads free room on the GPU(s) the waiting
model needs, not anywhere."""

from __future__ import annotations

import pytest
from doubles.fake_nvml import FakeDevice, FakeNvml
from test_residency import kinds

from supervisor.core.placement import Ask
from supervisor.core.residency import (
    Demand,
    Load,
    Mem,
    Model,
    ModelState,
    Placing,
    Rules,
    View,
    after_oom,
    decide,
    preview,
)
from supervisor.host import room

L, U = ModelState.LOADED, ModelState.UNLOADED
NOW = 1000.0
RULES = Rules(pass_over_s=5.0, wait_s=60.0)
DEVICES = ("CUDA0", "CUDA1")


def on(gpu: int, mib: float, name: str, pid: int, **kw: object) -> tuple[Model, int, int, float]:
    """A loaded model holding `mib` on `gpu` (NVML shows its process `pid` there)."""
    need = Mem(tuple(mib if i == gpu else 0.0 for i in range(gpu + 1)))
    return Model(id=name, state=L, need=need, measured=True, **kw), gpu, pid, mib  # type: ignore[arg-type]


def wanting(name: str, blocks: int, gpus: object = "auto") -> Model:
    """An unloaded model of `blocks` layers of 250 MiB (plus a 500 MiB output layer) that is asked for."""
    ask = Ask((250.0,) * blocks + (500.0,))
    return Model(id=name, state=U, need=Mem((blocks * 250.0 + 1268.0,)), placing=Placing(ask, gpus, DEVICES))  # type: ignore[arg-type]


def box(monkeypatch: pytest.MonkeyPatch, loaded: list[tuple[Model, int, int, float]], target: Model,
        other: tuple[float, float] = (0.0, 0.0)) -> View:
    """A 24 GB card and a 48 GB one; `other`: MiB held there by processes that are not models."""
    nvml = FakeNvml(FakeDevice("NVIDIA GeForce RTX 3090", 24576.0, other_mib=other[0]),
                    FakeDevice("NVIDIA RTX A6000", 49152.0, other_mib=other[1])).install(monkeypatch)
    for _, gpu, pid, mib in loaded:
        nvml.devices[gpu].processes[pid] = mib
    return View(tuple(m for m, *_ in loaded) + (target,), room.room(None), (Demand(target.id, 1, NOW),))


def said(actions: list) -> list[str]:
    """The actions in words (test_residency's), a load with the GPUs it goes to."""
    return [f"load {a.model} on {a.plan.placement.describe() if a.plan and a.plan.placement else '?'}"
            if isinstance(a, Load) else k for a, k in zip(actions, kinds(actions), strict=True)]


CASES = {
    "fits beside the others on the GPU with room: nothing is unloaded": (
        [on(0, 16000, "a", 11, last_used=1)], wanting("b", 40), (0, 0),
        ["load b on GPU 1"]),
    "fits no GPU, but the room left on both together: split rather than unload": (
        [on(0, 16000, "a", 11, last_used=2), on(1, 30000, "c", 12, last_used=1)], wanting("b", 80), (0, 0),
        ["load b on GPUs 0+1 (24:57 layers)"]),
    "the least recently used idle model goes, and it loads where that freed the room": (
        [on(0, 16000, "a", 11, last_used=2), on(1, 30000, "c", 12, last_used=1)], wanting("b", 120), (0, 0),
        ["unload c (lru)", "load b on GPU 1"]),
    "gpus [0]: only models on GPU 0 are unloaded, though an older one sits on GPU 1": (
        [on(0, 16000, "a", 11, last_used=2), on(1, 30000, "c", 12, last_used=1)], wanting("b", 40, (0,)), (0, 0),
        ["unload a (lru)", "load b on GPU 0"]),
    "an unload that freed a GPU the model did not go to is not done": (
        [on(0, 2000, "a", 11, last_used=1), on(1, 30000, "c", 12, last_used=2)], wanting("b", 150), (12000, 4000),
        ["unload c (lru)", "load b on GPU 1"]),
    "busy on the GPU it needs: it waits, and the idle model on the other GPU is left alone": (
        [on(0, 16000, "idle", 11, last_used=1), on(1, 40000, "busy", 12, last_used=2, in_flight=1)],
        wanting("b", 80, (1,)), (0, 0),
        ["wait b"]),
    "bigger than any GPU: split, and of the unloads only those it needs (a's GPU 0 room is not)": (
        [on(0, 12000, "a", 11, last_used=1), on(1, 30000, "c", 12, last_used=2)], wanting("b", 200), (0, 0),
        ["unload c (lru)", "load b on GPUs 0+1 (39:162 layers)"]),
    "too big even for both: everything on them goes, and it loads with fewer layers": (
        [on(0, 12000, "a", 11, last_used=1), on(1, 30000, "c", 12, last_used=2)], wanting("b", 400), (0, 0),
        ["unload a (lru)", "unload c (lru)", "load b on GPUs 0+1 (90:182 layers)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decide_per_gpu(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded, target, other, expected = CASES[case]
    assert said(decide(box(monkeypatch, loaded, target, other), RULES, NOW)) == expected


def test_the_preview_is_the_decision_without_doing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    v = box(monkeypatch, [on(0, 16000, "a", 11, last_used=2), on(1, 30000, "c", 12, last_used=1)], wanting("b", 120))
    pv = preview(v, v.models[-1])
    assert pv.unload == ("c",) and pv.wait_for == () and pv.refused is None
    assert pv.plan is not None and pv.plan.placement is not None and pv.plan.placement.gpus == (1,)
    assert pv.need.gpu_mib == (0.0, pytest.approx(120 * 250 + 500 + 768))
    # Asked while c is busy: the idle a goes instead, and b is split over the room that leaves.
    busy = View(tuple(m if m.id != "c" else Model("c", L, m.need, True, in_flight=2, last_used=1) for m in v.models),
                v.room, v.demands)
    pv = preview(busy, v.models[-1])
    assert pv.unload == ("a",) and pv.wait_for == () and pv.plan is not None and pv.plan.kind == "split"
    # And with a pinned too, it would wait for c (the drain comes after pass_over_s).
    pinned = View(tuple(m if m.id != "a" else Model("a", L, m.need, True, pinned=True) for m in busy.models),
                  v.room, v.demands)
    assert preview(pinned, v.models[-1]).wait_for == ("c",)


def test_after_an_oom_only_models_on_the_gpu_that_ran_out_go(monkeypatch: pytest.MonkeyPatch) -> None:
    v = box(monkeypatch, [on(0, 1000, "a", 11, last_used=1), on(1, 1000, "c", 12, last_used=2),
                          on(1, 1000, "d", 13, last_used=3, in_flight=1)], wanting("b", 40))
    oomed = View(tuple(m if m.id != "b" else Model("b", ModelState.LOADING, m.need) for m in v.models), v.room)
    assert [u.model for u in after_oom(oomed, "b", frozenset({1}))] == ["c"]
    assert [u.model for u in after_oom(oomed, "b")] == ["a", "c"]
