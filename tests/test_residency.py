"""The residency decision, as tables: what stays loaded, what goes, in which order, and what waits."""

from __future__ import annotations

import pytest

from supervisor.core.catalog import Entry, name_problems, resolve
from supervisor.core.estimate import RESERVE_MIB, Footprint
from supervisor.core.residency import (
    Demand,
    Drain,
    Load,
    Mem,
    Model,
    ModelState,
    Reject,
    Room,
    Rules,
    Unload,
    View,
    Wait,
    after_oom,
    decide,
    estimate_need,
)

L, U, LD, DR, F = ModelState.LOADED, ModelState.UNLOADED, ModelState.LOADING, ModelState.DRAINING, ModelState.FAILED
RULES = Rules(pass_over_s=5.0, wait_s=60.0)
NOW = 1000.0


def host(mib: float, state: ModelState = L, name: str = "", **kw: object) -> Model:
    return Model(id=name, state=state, need=Mem(host_mib=mib), **kw)  # type: ignore[arg-type]


def gpu(mib: float, state: ModelState = L, name: str = "", **kw: object) -> Model:
    return Model(id=name, state=state, need=Mem(gpu_mib=(mib,)), **kw)  # type: ignore[arg-type]


def view(*models: Model, budget: float | None = None, gpu_free: tuple[float, ...] = (),
         want: tuple[tuple[str, float], ...] = ()) -> View:
    return View(tuple(models), Room(gpu_free_mib=gpu_free, host_budget_mib=budget),
                tuple(Demand(m, 1, since) for m, since in want))


def kinds(actions: list) -> list[str]:
    out = []
    for a in actions:
        match a:
            case Load(model=m):
                out.append(f"load {m}")
            case Unload(model=m, reason=r):
                out.append(f"unload {m} ({r})")
            case Drain(model=m):
                out.append(f"drain {m}")
            case Wait(model=m):
                out.append(f"wait {m}")
            case Reject(model=m):
                out.append(f"reject {m}")
    return out


CASES = {
    "fits next to the loaded one: load, evict nothing": (
        view(host(300, name="a", last_used=1), host(300, U, "b"), budget=1000, want=(("b", NOW),)),
        ["load b"]),
    "does not fit: the least recently used idle model goes first": (
        view(host(400, name="a", last_used=5), host(400, name="c", last_used=1), host(400, U, "b"),
             budget=1000, want=(("b", NOW),)),
        ["unload c (lru)", "load b"]),
    "evicts as many as needed, in LRU order": (
        view(host(400, name="a", last_used=5), host(400, name="c", last_used=1), host(900, U, "b"),
             budget=1000, want=(("b", NOW),)),
        ["unload c (lru)", "unload a (lru)", "load b"]),
    "pinned models are never evicted, even when least recently used": (
        view(host(400, name="a", last_used=5), host(400, name="p", last_used=1, pinned=True), host(400, U, "b"),
             budget=1000, want=(("b", NOW),)),
        ["unload a (lru)", "load b"]),
    "a busy model is not unloaded; the group waits while it is passed over for less than pass_over_s": (
        view(host(600, name="a", in_flight=2), host(600, U, "b"), budget=1000, want=(("b", NOW - 1),)),
        ["wait b"]),
    "passed over for pass_over_s: the busy model is drained, never unloaded mid-request": (
        view(host(600, name="a", in_flight=2), host(600, U, "b"), budget=1000, want=(("b", NOW - 5),)),
        ["drain a", "wait b"]),
    "an idle model goes before a busy one, even a more recently used one": (
        view(host(600, name="busy", in_flight=1, last_used=1), host(300, name="idle", last_used=9),
             host(600, U, "b"), budget=1300, want=(("b", NOW),)),
        ["unload idle (lru)", "load b"]),
    "a drained model is unloaded once its requests are done, then the waiting one loads": (
        view(host(600, DR, "a", draining_for="lru"), host(600, U, "b"), budget=1000, want=(("b", NOW - 6),)),
        ["unload a (lru)", "load b"]),
    "a draining model with requests in flight is waited for, not drained twice": (
        view(host(600, DR, "a", in_flight=1, draining_for="lru"), host(600, U, "b"), budget=1000,
             want=(("b", NOW - 30),)),
        ["wait b"]),
    "one load at a time": (
        view(host(100, LD, "a"), host(100, U, "b"), budget=1000, want=(("b", NOW),)),
        []),
    "the oldest waiting group is served first": (
        view(host(100, U, "a"), host(100, U, "b"), budget=1000, want=(("b", NOW - 3), ("a", NOW - 1))),
        ["load b"]),
    "requests for a failed model are refused": (
        view(host(100, F, "a"), budget=1000, want=(("a", NOW),)),
        ["reject a"]),
    "a group that waited longer than wait_s is refused": (
        view(host(600, name="a", in_flight=1), host(600, U, "b"), budget=1000, want=(("b", NOW - 60),)),
        ["reject b"]),
    "host budget too small even alone: refused with the reason": (
        view(host(100, name="a"), host(2000, U, "b"), budget=1000, want=(("b", NOW),)),
        ["reject b"]),
    "too big for the GPU even alone: everything else idle goes, then it loads (the ladder fits it)": (
        view(gpu(3000, name="a"), gpu(9000, U, "b"), gpu_free=(2000,), want=(("b", NOW),)),
        ["unload a (lru)", "load b"]),
    "GPU: freed VRAM of an evicted model counts towards the fit": (
        view(gpu(3000, name="a", last_used=2), gpu(1000, name="c", last_used=1), gpu(3500, U, "b"),
             gpu_free=(1000,), want=(("b", NOW),)),
        ["unload c (lru)", "unload a (lru)", "load b"]),
    "GPU: fits in what NVML says is free": (
        view(gpu(3000, name="a"), gpu(3500, U, "b"), gpu_free=(4000,), want=(("b", NOW),)),
        ["load b"]),
    "no budget and no GPU figures: nothing constrains, all load": (
        view(host(5000, name="a"), host(5000, U, "b"), want=(("b", NOW),)),
        ["load b"]),
    "ttl: idle past its ttl is unloaded": (
        view(host(100, name="a", ttl_s=60, last_used=NOW - 61)),
        ["unload a (ttl)"]),
    "ttl: not yet": (
        view(host(100, name="a", ttl_s=60, last_used=NOW - 59)),
        []),
    "ttl: busy is never unloaded": (
        view(host(100, name="a", ttl_s=60, last_used=NOW - 600, in_flight=1)),
        []),
    "ttl: pinned is never unloaded": (
        view(host(100, name="a", ttl_s=60, last_used=NOW - 600, pinned=True)),
        []),
    "ttl 0 means never": (
        view(host(100, name="a", ttl_s=0, last_used=0)),
        []),
    "ttl frees room: the ttl unload counts for the waiting model": (
        view(host(600, name="a", ttl_s=10, last_used=NOW - 11), host(600, U, "b"), budget=1000,
             want=(("b", NOW),)),
        ["unload a (ttl)", "load b"]),
    "requests for a loaded model are no demand": (
        view(host(600, name="a"), budget=1000),
        []),
    "a model being loaded is not loaded twice": (
        view(host(600, LD, "a"), budget=1000, want=(("a", NOW),)),
        []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decide(case: str) -> None:
    v, expected = CASES[case]
    assert kinds(decide(v, RULES, NOW)) == expected


def test_loaded_models_keep_serving_while_a_swap_waits() -> None:
    """A demand for b never touches a: no drain, no unload, just a wait, until the bound."""
    v = view(host(600, name="a", in_flight=1), host(600, U, "b"), budget=1000, want=(("b", NOW - 4.9),))
    acts = decide(v, RULES, NOW)
    assert not [a for a in acts if isinstance(a, Drain | Unload)]


def test_never_unloads_a_model_with_requests_in_flight() -> None:
    """Over many random-ish views: an Unload only ever names an idle model."""
    for in_flight in range(3):
        for state in (L, DR):
            for since in (NOW, NOW - 4, NOW - 10):
                v = view(host(600, state, "a", in_flight=in_flight, ttl_s=1, last_used=0, draining_for="lru"),
                         host(600, U, "b"), budget=1000, want=(("b", since),))
                for a in decide(v, RULES, NOW):
                    if isinstance(a, Unload):
                        assert a.model != "a" or in_flight == 0


def test_grouped_demand_is_one_swap() -> None:
    """Ten requests for b waiting as one group: one load, not ten."""
    v = View((host(600, name="a"), host(600, U, "b")), Room(host_budget_mib=1000), (Demand("b", 10, NOW - 1),))
    assert kinds(decide(v, RULES, NOW)) == ["unload a (lru)", "load b"]


def test_reject_message_names_budget() -> None:
    v = view(host(2000, U, "b"), budget=1000, want=(("b", NOW),))
    (r,) = decide(v, RULES, NOW)
    assert isinstance(r, Reject) and "memory_budget_mib 1000" in r.detail and "2000" in r.detail


def test_after_oom_unloads_idle_others_in_lru_order_only() -> None:
    v = view(gpu(100, LD, "b"), gpu(100, name="idle2", last_used=9), gpu(100, name="idle1", last_used=1),
             gpu(100, name="busy", in_flight=1), gpu(100, name="pin", pinned=True), gpu(100, U, "off"))
    assert [(u.model, u.reason) for u in after_oom(v, "b")] == [("idle1", "oom"), ("idle2", "oom")]


def test_after_oom_alone_is_the_ladder() -> None:
    assert after_oom(view(gpu(100, LD, "b"), gpu(100, name="busy", in_flight=3)), "b") == []


# ---- names ---------------------------------------------------------------------------------------

NAMES = {"vision": "vision", "vl": "vision", "gemma": "gemma", "small": "gemma"}


@pytest.mark.parametrize(("requested", "strict", "expected"), [
    (None, True, "vision"), ("", True, "vision"), ("vision", True, "vision"), ("small", True, "gemma"),
    ("gpt-4", True, None), ("gpt-4", False, "vision"), ("gemma", False, "gemma"),
])
def test_resolve(requested: str | None, strict: bool, expected: str | None) -> None:
    assert resolve(requested, NAMES, "vision", strict=strict) == expected


def test_name_clashes_are_named() -> None:
    entries = [Entry("vision", ("vl",), "a.yaml"), Entry("gemma", ("vl", "g"), "b.yaml"), Entry("g", (), "c.yaml")]
    problems = name_problems(entries)
    assert ("b.yaml", "aliases", "'vl' is already an alias of profile 'vision' (a.yaml)") in problems
    assert ("c.yaml", "name", "'g' is already an alias of profile 'gemma' (b.yaml)") in problems
    assert len(problems) == 2


# ---- estimates before a model ever ran ------------------------------------------------------------

FP = Footprint(n_layers=4, layer_mib=(100.0, 100.0, 100.0, 100.0), output_mib=50.0, kv_mib_per_layer=10.0,
               mmproj_mib=30.0)


@pytest.mark.parametrize(("layers", "on_gpu", "gpu_mib", "host_mib"), [
    (None, True, 4 * 110 + 50 + 30 + RESERVE_MIB, 0 + 64),  # everything offloaded
    (2, True, 2 * 110 + 30 + RESERVE_MIB, 450 - 200 + 20 + 64),  # the last two blocks on the GPU
    (0, True, None, 450 + 30 + 40 + 64),  # n_gpu_layers 0: all on the host
    (None, False, None, 450 + 30 + 40 + 64),  # no GPU
])
def test_estimate_need(layers: int | None, on_gpu: bool, gpu_mib: float | None, host_mib: float) -> None:
    need = estimate_need(FP, 450.0, 30.0, layers, on_gpu=on_gpu)
    assert need.gpu_mib == (() if gpu_mib is None else (gpu_mib,))
    assert need.host_mib == host_mib


def test_estimate_without_a_readable_header_is_the_files() -> None:
    assert estimate_need(None, 450.0, 30.0, None, on_gpu=True) == Mem((), 450 + 30 + 64)
