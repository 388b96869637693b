"""Where a model goes on 1, 2 and 4 GPUs of mixed sizes and mixed free room, as tables (core/placement.py)."""

from __future__ import annotations

import numpy as np
import pytest

from supervisor.core.capabilities import Listed, parse_devices, parse_listing
from supervisor.core.estimate import RESERVE_FRACTION, RESERVE_MIB
from supervisor.core.placement import Ask, Gpu, Placement, allowed, choice_problem, match_devices, place

NAMES = {24576: "NVIDIA GeForce RTX 3090", 12288: "NVIDIA GeForce RTX 3060", 49152: "NVIDIA RTX A6000",
         81559: "NVIDIA H100 80GB HBM3"}


def gpu(index: int, total: float, free: float, device: bool = True) -> Gpu:
    return Gpu(index, NAMES.get(int(total), "NVIDIA X"), total, free, f"GPU-{index:04d}aaaa-bbbb",
               f"CUDA{index}" if device else "")


def model(blocks: int, block_mib: float = 250.0, output_mib: float = 500.0, fixed: float = 0.0,
          layers: int | None = None) -> Ask:
    return Ask((block_mib,) * blocks + (output_mib,), fixed, layers)


def usable(free: float) -> float:
    return free - RESERVE_MIB - RESERVE_FRACTION * free


CARD24, CARD12, CARD48, CARD80 = 24576.0, 12288.0, 49152.0, 81559.0

# (name, gpus, model, choice, kind, gpus used, layers on each (split) or None, layers in all)
CASES = [
    # ---- one GPU
    ("1 GPU: fits", [gpu(0, CARD24, 20000)], model(40), "auto", "one", (0,), None, 41),
    ("1 GPU: too small, the most layers that fit", [gpu(0, CARD24, 8000)], model(40), "auto", "partial", (0,),
     None, 1 + int((usable(8000) - 500) // 250)),
    ("1 GPU: not one layer fits", [gpu(0, CARD24, 900)], model(40), "auto", "none", (), None, 0),
    ("1 GPU named by index", [gpu(0, CARD24, 20000)], model(40), (0,), "one", (0,), None, 41),
    ("1 GPU, explicit layer count: only those are placed", [gpu(0, CARD24, 8000)], model(40, layers=10), "auto",
     "one", (0,), None, 10),
    ("1 GPU the binary has no device for", [gpu(0, CARD24, 20000, device=False)], model(40), "auto", "unplaced",
     (), None, 41),
    ("no GPU", [], model(40), "auto", "unplaced", (), None, 41),
    ("n_gpu_layers 0", [gpu(0, CARD24, 20000)], model(40, layers=0), "auto", "unplaced", (), None, 0),
    # ---- two GPUs: a 24 GB card beside a 48 GB one
    ("2 GPUs: fits both, best fit is the one it leaves least room on", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)],
     model(40), "auto", "one", (0,), None, 41),
    ("2 GPUs: fits only the bigger", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)], model(100, 300), "auto", "one",
     (1,), None, 101),
    ("2 GPUs: mixed free room on equal cards: the fuller one, where it fits tightest",
     [gpu(0, CARD24, 22000), gpu(1, CARD24, 12000)], model(40), "auto", "one", (1,), None, 41),
    ("2 GPUs: fits neither: split in proportion to room", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)],
     model(150, 300), "auto", "split", (0, 1), (50, 101), 151),
    ("2 GPUs: fits neither together: fewer layers over both", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)],
     model(250, 300), "auto", "partial", (0, 1), None,
     int(usable(20000) // 300) + 1 + int((usable(40000) - 500) // 300)),  # whole layers on each GPU
    ("2 GPUs: gpus [1] is respected where 0 would be the best fit", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)],
     model(40), (1,), "one", (1,), None, 41),
    ("2 GPUs: gpus [0] means fewer layers rather than the other GPU", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)],
     model(100, 300), (0,), "partial", (0,), None, 1 + int((usable(20000) - 500) // 300)),
    ("2 GPUs: a GPU named by UUID prefix", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)], model(40),
     ("GPU-0001aaaa",), "one", (1,), None, 41),
    ("2 GPUs: the projector needs room on the first device", [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)],
     model(40, fixed=5000), "auto", "one", (0,), None, 41),
    ("2 GPUs: a projector too big for the small card's share moves the model to the big one",
     [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)], model(40, fixed=12000), "auto", "one", (1,), None, 41),
    # ---- four GPUs: 12, 24, 48 and 80 GB with other processes on them
    ("4 GPUs: the smallest card that holds it", [gpu(0, CARD12, 11000), gpu(1, CARD24, 23000), gpu(2, CARD48, 9000),
                                                 gpu(3, CARD80, 70000)], model(40), "auto", "one", (1,), None, 41),
    ("4 GPUs: the fewest GPUs: the two with most room, not the first two",
     [gpu(0, CARD12, 11000), gpu(1, CARD24, 23000), gpu(2, CARD48, 45000), gpu(3, CARD80, 30000)],
     model(200, 300), "auto", "split", (2, 3), (121, 80), 201),
    ("4 GPUs: three needed", [gpu(0, CARD12, 11000), gpu(1, CARD24, 23000), gpu(2, CARD48, 45000),
                              gpu(3, CARD80, 30000)], model(280, 300), "auto", "split", (1, 2, 3), None, 281),
    ("4 GPUs: all four and still fewer layers", [gpu(0, CARD12, 11000), gpu(1, CARD24, 23000), gpu(2, CARD48, 45000),
                                                 gpu(3, CARD80, 30000)], model(400, 300), "auto", "partial",
     (0, 1, 2, 3), None, None),
    ("4 GPUs: only those allowed", [gpu(0, CARD12, 11000), gpu(1, CARD24, 23000), gpu(2, CARD48, 45000),
                                    gpu(3, CARD80, 30000)], model(100, 300), (0, 1), "split", (0, 1), None, 101),
    ("4 GPUs: one the binary cannot address is passed over", [gpu(0, CARD12, 11000), gpu(1, CARD24, 23000),
                                                              gpu(2, CARD48, 45000, device=False),
                                                              gpu(3, CARD80, 70000)],
     model(100, 300), "auto", "one", (3,), None, 101),
]


@pytest.mark.parametrize(("gpus", "ask", "choice", "kind", "used", "split", "layers"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_place(gpus: list[Gpu], ask: Ask, choice, kind: str, used: tuple[int, ...], split, layers) -> None:
    plan = place(ask, gpus, choice)
    assert plan.kind == kind, plan.why
    p = plan.placement
    assert (p.gpus if p else ()) == used, plan.why
    if split is not None:
        assert p is not None and p.split == split
    if layers is not None:
        assert plan.layers == layers
    if p is None:
        return
    by_index = {g.index: g for g in gpus}
    assert p.devices == tuple(f"CUDA{i}" for i in p.gpus) and p.uuids == tuple(by_index[i].uuid for i in p.gpus)
    assert len(plan.need_mib) == len(p.gpus)
    # What each GPU is expected to hold fits its room, with the reserve the estimate keeps.
    for i, need in zip(p.gpus, plan.need_mib, strict=True):
        assert need - RESERVE_MIB <= usable(by_index[i].free_mib) + 1e-6
    if len(p.gpus) > 1:
        assert sum(p.split) == plan.layers and all(c > 0 for c in p.split)
    if kind == "split":
        # In proportion to room: each share within a layer of the GPU's part of the usable room.
        rooms = [usable(by_index[i].free_mib) - (ask.fixed_mib if n == 0 else 0) for n, i in enumerate(p.gpus)]
        for c, r in zip(p.split, rooms, strict=True):
            assert abs(c - plan.layers * r / sum(rooms)) <= 1.0
    if kind == "partial":
        # One more layer would not fit anywhere: the ladder's fewer layers are the most that fit.
        more = place(Ask(ask.layer_mib, ask.fixed_mib, plan.layers + 1), [by_index[i] for i in p.gpus])
        assert not more.whole


def llama_cpp_assignment(split: tuple[int, ...], n_layers: int) -> list[int]:
    """llama.cpp's llama_model_base::load_tensors: layers per device for --tensor-split `split` (float32 as there)."""
    act = np.int32(sum(split))
    cum = np.cumsum(np.array(split, dtype=np.float32), dtype=np.float32)
    cum = cum / cum[-1]
    counts = [0] * len(split)
    start = n_layer_all = n_layers  # blocks; the output layer is index n_layer_all
    start = max(n_layer_all + 1 - int(act), 0)
    for il in range(start, n_layer_all + 1):
        frac = np.float32(il - start) / np.float32(act)
        counts[int(np.searchsorted(cum, frac, side="right"))] += 1
    return counts


@pytest.mark.parametrize("split", [(50, 101), (1, 2), (3, 3, 3), (7, 1, 1, 30), (110, 91), (1, 1)])
def test_a_split_of_layer_counts_gives_llama_cpp_exactly_those_counts(split: tuple[int, ...]) -> None:
    assert llama_cpp_assignment(split, n_layers=sum(split) + 5) == list(split)


def test_the_plan_says_what_and_why() -> None:
    plan = place(model(150, 300), [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)])
    d = plan.as_dict()
    assert d["kind"] == "split" and d["gpus"] == [0, 1] and d["devices"] == ["CUDA0", "CUDA1"]
    assert set(d["need_mib"]) == {"0", "1"} and "fits no single GPU" in d["why"] and "GPUs 0+1" in d["why"]
    assert Placement.from_dict(plan.placement.as_dict()) == plan.placement  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="inconsistent"):
        Placement.from_dict({"gpus": [0, 1], "devices": ["CUDA0"]})


TWO = [gpu(0, CARD24, 20000), gpu(1, CARD48, 40000)]


@pytest.mark.parametrize(("choice", "gpus", "fragment"), [
    ((2,), TWO, "GPU 2 is not on this box; GPUs seen: 0 (NVIDIA GeForce RTX 3090, GPU-0000aaaa-bbbb, CUDA0); "
                "1 (NVIDIA RTX A6000"),
    (("GPU-ffff",), TWO, "GPU 'GPU-ffff' is not on this box"),
    (("GPU-0000",), [Gpu(0, "A", 1, 1, "GPU-00001111"), Gpu(1, "A", 1, 1, "GPU-00002222")], "matches several GPUs (0, 1)"),
    (("GPU-000",), TWO, "GPU 'GPU-000' is not on this box"),  # too short a part of a UUID to name one
    ((0, "GPU-0000aaaa-bbbb"), TWO, "is GPU 0, already named as 0"),
    ((0,), [], "GPU 0 named, but this box has no NVIDIA GPU that NVML can see (OSError: libnvidia-ml.so.1"),
    ((1,), [gpu(0, CARD24, 1), gpu(1, CARD48, 1, device=False)], "GPU 1 (NVIDIA RTX A6000) has no device in this "
                                                                   "llama-server's --list-devices"),
])
def test_a_choice_the_box_cannot_honour_is_named(choice, gpus: list[Gpu], fragment: str) -> None:
    problem = choice_problem(choice, gpus, nvml="OSError: libnvidia-ml.so.1: cannot open shared object file")
    assert problem is not None and fragment in problem
    assert choice_problem("auto", gpus) is None
    assert choice_problem((0,), TWO) is None and [g.index for g in allowed((1, 0), TWO)] == [0, 1]


LISTING = """\
ggml_cuda_init: found 2 CUDA devices:
Available devices:
  CUDA0: NVIDIA GeForce RTX 3090 (24135 MiB, 23800 MiB free)
  CUDA1: NVIDIA RTX A6000 (48539 MiB, 48200 MiB free)
"""


def test_list_devices_parsed_with_descriptions() -> None:
    assert parse_devices(LISTING) == ["CUDA0", "CUDA1"]
    assert parse_listing(LISTING) == [Listed("CUDA0", "NVIDIA GeForce RTX 3090", 24135.0),
                                      Listed("CUDA1", "NVIDIA RTX A6000", 48539.0)]


@pytest.mark.parametrize(("listing", "visible", "names", "reason"), [
    (LISTING, None, ["CUDA0", "CUDA1"], None),
    # CUDA_VISIBLE_DEVICES reorders: CUDA0 is then NVML's GPU 1.
    (LISTING.replace("CUDA0: NVIDIA GeForce RTX 3090 (24135", "CUDA9: x (1").replace("CUDA1", "CUDA0")
     .replace("CUDA9: x (1", "CUDA1: NVIDIA GeForce RTX 3090 (24135"), "1,0", ["CUDA1", "CUDA0"], None),
    ("Available devices:\n  CUDA0: NVIDIA RTX A6000 (48539 MiB, 48200 MiB free)\n", "GPU-0001aaaa", ["", "CUDA0"], None),
    # Fastest first (an order the supervisor did not ask for) shows as names that do not fit.
    (LISTING.replace("NVIDIA GeForce RTX 3090 (24135", "NVIDIA Q (48539").replace("RTX A6000 (48539", "RTX 3090 (24135"),
     None, ["", ""], "does not look like NVML's GPU 0"),
    ("Available devices:\n  CUDA0: NVIDIA GeForce RTX 3090 (24135 MiB, 23800 MiB free)\n", None, ["", ""],
     "lists 1 CUDA device(s), NVML 2 visible"),
    ("Available devices:\n  Vulkan0: NVIDIA GeForce RTX 3090 (24135 MiB, 23800 MiB free)\n", None, ["", ""],
     "lists no CUDA device"),
    (LISTING, "0,7", ["", ""], "CUDA_VISIBLE_DEVICES entry '7' is not one GPU"),
])
def test_devices_matched_to_nvml(listing: str, visible: str | None, names: list[str], reason: str | None) -> None:
    gpus, why = match_devices(parse_listing(listing), TWO, visible)
    assert [g.device for g in gpus] == names
    assert (why is None) if reason is None else (why is not None and reason in why)
