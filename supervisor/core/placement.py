"""Where a model goes on a box with several GPUs. Pure: no I/O (host/gpu.py and the binary's --list-devices feed it).

A profile's `gpus` is `auto` (every GPU) or the GPUs it may use. Among those:
1. the whole model fits on one GPU: that one, the best fit (where it leaves the least room, so that a bigger
   model still finds a whole card later);
2. otherwise split it over the fewest GPUs (those with the most room), each GPU's share of the layers
   proportional to its room;
3. otherwise the most layers that all of those GPUs hold together (the ladder's fewer layers), the rest on the CPU.

Costs are llama.cpp's: it offloads the last N layers (blocks, then the output layer), hands each device of its
--device list a contiguous run of them in that order (--tensor-split), and puts the vision projector on the
first device. Each GPU used keeps a reserve for its compute buffers and CUDA context (core/estimate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import accumulate
from typing import Any, Literal

from .capabilities import Listed
from .estimate import RESERVE_FRACTION, RESERVE_MIB, Footprint

Selector = int | str  # an NVML index, or a GPU's UUID (or its leading part, as nvidia-smi takes it)
Choice = Literal["auto"] | tuple[Selector, ...]
Kind = Literal["one", "split", "partial", "none", "unplaced"]


@dataclass(frozen=True)
class Gpu:
    """One GPU as the decision sees it."""

    index: int  # NVML's (PCI bus order): what `gpus:` and every per-GPU figure use
    name: str
    total_mib: float
    free_mib: float  # room for this model: free now, plus what it may count on (its own child's, models unloaded)
    uuid: str = ""
    device: str = ""  # llama-server's name for it ("CUDA1"); "" when the binary has none for it


@dataclass(frozen=True)
class Ask:
    """What a model puts on the GPUs at given settings."""

    layer_mib: tuple[float, ...]  # each offloadable layer in llama.cpp's order: blocks (weights + KV cache), output
    fixed_mib: float = 0.0  # on the first device only: the vision projector
    layers: int | None = None  # how many of them (the last ones) to offload; None: all

    @property
    def n(self) -> int:
        return len(self.layer_mib)

    @property
    def wanted(self) -> int:
        return self.n if self.layers is None else max(0, min(self.layers, self.n))

    @cached_property
    def _prefix(self) -> tuple[float, ...]:
        return (0.0, *accumulate(self.layer_mib))

    def run_mib(self, count: int, start: int, length: int) -> float:
        """The cost of `length` layers from `start` within the last `count` layers."""
        first = self.n - count + start
        return self._prefix[first + length] - self._prefix[first]


def ask_for(fp: Footprint, layers: int | None, *, mmproj_offload: bool = True) -> Ask:
    costs = tuple(fp.layer_cost(i) for i in range(fp.n_layers)) + (fp.output_mib,)
    return Ask(costs, fp.mmproj_mib if mmproj_offload else 0.0, layers)


@dataclass(frozen=True)
class Placement:
    """The GPUs a child runs on, in llama-server's --device order, and its layers on each."""

    gpus: tuple[int, ...]  # NVML indexes
    devices: tuple[str, ...]  # llama-server's names for them
    split: tuple[int, ...] = ()  # layers on each device, when more than one
    uuids: tuple[str, ...] = ()  # to tell, later, that these indexes are still the same cards

    def describe(self) -> str:
        if len(self.gpus) == 1:
            return f"GPU {self.gpus[0]}"
        return "GPUs " + "+".join(map(str, self.gpus)) + (f" ({':'.join(map(str, self.split))} layers)"
                                                         if self.split else "")

    def as_dict(self) -> dict[str, Any]:
        return {"gpus": list(self.gpus), "devices": list(self.devices), "split": list(self.split),
                "uuids": list(self.uuids)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        gpus, devices = tuple(int(x) for x in d["gpus"]), tuple(str(x) for x in d["devices"])
        split = tuple(int(x) for x in d.get("split", ()))
        if not gpus or len(gpus) != len(devices) or (split and len(split) != len(gpus)):
            raise ValueError(f"inconsistent placement: {d}")
        return cls(gpus, devices, split, tuple(str(x) for x in d.get("uuids", ())))


@dataclass(frozen=True)
class Plan:
    kind: Kind  # one GPU, split, partial (fewer layers), none (not one layer fits), unplaced (nothing to decide)
    placement: Placement | None
    layers: int  # offloadable layers on the GPUs
    of: int  # offloadable layers asked for
    need_mib: tuple[float, ...]  # expected VRAM on each GPU of the placement
    why: str

    @property
    def whole(self) -> bool:
        """Everything asked for is on the GPUs."""
        return self.kind in ("one", "split")

    def as_dict(self) -> dict[str, Any]:
        p = self.placement
        return {"kind": self.kind, "gpus": list(p.gpus) if p else [], "devices": list(p.devices) if p else [],
                "split": list(p.split) if p else [], "layers": self.layers, "of": self.of,
                "need_mib": {str(g): round(m) for g, m in zip(p.gpus if p else (), self.need_mib, strict=True)},
                "why": self.why}


# ---- which GPUs a profile may use ----------------------------------------------------------------


def _is(sel: Selector, g: Gpu) -> bool:
    if isinstance(sel, int):
        return g.index == sel
    return bool(g.uuid) and (g.uuid == sel or (len(sel) >= 8 and g.uuid.startswith(sel)))


def allowed(choice: Choice, gpus: Sequence[Gpu]) -> list[Gpu]:
    """The GPUs `choice` lets a model use, by NVML index (a GPU named but gone is simply not among them)."""
    if choice == "auto":
        return sorted(gpus, key=lambda g: g.index)
    return sorted({g.index: g for g in gpus if any(_is(s, g) for s in choice)}.values(), key=lambda g: g.index)


def seen(gpus: Sequence[Gpu]) -> str:
    return "; ".join(f"{g.index} ({g.name}, {g.uuid or 'no UUID'}" + (f", {g.device})" if g.device else ")")
                     for g in sorted(gpus, key=lambda g: g.index)) or "none"


def choice_problem(choice: Choice, gpus: Sequence[Gpu], *, nvml: str | None = None,
                   devices: Sequence[str] = (), unmatched: str | None = None) -> str | None:
    """Why `choice` cannot be used on this box (None: it can). `nvml`: why NVML sees no GPU, when it sees none;
    `devices`: the binary's own --list-devices names; `unmatched`: why they could not be matched to NVML's."""
    if choice == "auto":
        return None
    if not gpus:
        return (f"{_names(choice)} named, but this box has no NVIDIA GPU that NVML can see ({nvml or 'no GPU'}); "
                "leave gpus out (or 'auto') to run where the binary can")
    picked: dict[int, Selector] = {}
    for sel in choice:
        match = [g for g in gpus if _is(sel, g)]
        if not match:
            return f"GPU {sel!r} is not on this box; GPUs seen: {seen(gpus)}"
        if len(match) > 1:
            return f"GPU {sel!r} matches several GPUs ({', '.join(str(g.index) for g in match)}): give more of the UUID"
        g = match[0]
        if g.index in picked:
            return f"GPU {sel!r} is GPU {g.index}, already named as {picked[g.index]!r}"
        picked[g.index] = sel
        if not g.device:
            return (f"GPU {g.index} ({g.name}) has no device in this llama-server's --list-devices "
                    f"({', '.join(devices) or 'none: a build without CUDA'})"
                    + (f": {unmatched}" if unmatched else "") + ", so nothing can be placed there")
    return None


def _names(choice: tuple[Selector, ...]) -> str:
    return "GPU " + ", ".join(repr(s) for s in choice)


# ---- llama-server's device names for NVML's GPUs ------------------------------------------------------


def match_devices(listing: Sequence[Listed], gpus: Sequence[Gpu], visible: str | None) -> tuple[list[Gpu], str | None]:
    """`gpus` with their llama-server device name, and why none could be given (None: matched).

    How a "CUDAk" of `--list-devices` is told to be NVML's GPU i:
    - Only CUDA devices are matched: they are NVIDIA's, the GPUs NVML reports (a Vulkan device may be the same
      card, but numbered in Vulkan's order: it is not placed on).
    - CUDA numbers devices fastest first by default, NVML by PCI bus id. The supervisor runs the probe and every
      child with CUDA_DEVICE_ORDER=PCI_BUS_ID (core/command.py), so CUDAk is the k-th visible GPU in NVML order.
    - CUDA_VISIBLE_DEVICES (the supervisor's environment) hides and reorders them: CUDAk is then its k-th entry,
      an NVML index or a UUID (or its leading part).
    - Checked, not assumed: CUDAk's description must be the NVML name of the GPU it is taken for (both are the
      driver's name of the card) and their total memory must agree within 5% (CUDA reports a little less: the
      driver's own reservation). Any disagreement (another count, a MIG slice, a card the order does not
      explain) matches nothing: no placement, llama-server's own default, and the reason is shown.
    """
    cuda = sorted((d for d in listing if d.name.startswith("CUDA") and d.name[4:].isdigit()),
                  key=lambda d: int(d.name[4:]))
    bare = [replace(g, device="") for g in gpus]
    if not cuda:
        return bare, "this llama-server lists no CUDA device" if gpus else None
    by_index = {g.index: g for g in gpus}
    if visible is None or not visible.strip():
        order = sorted(by_index)
    else:
        order = []
        for entry in (e.strip() for e in visible.split(",")):
            sel: Selector = int(entry) if entry.isdigit() else entry
            found = [g.index for g in gpus if _is(sel, g)]
            if len(found) != 1:
                return bare, f"CUDA_VISIBLE_DEVICES entry {entry!r} is not one GPU NVML sees ({seen(gpus)})"
            order.append(found[0])
    if len(order) != len(cuda):
        return bare, (f"llama-server lists {len(cuda)} CUDA device(s), NVML {len(order)} visible GPU(s): "
                      "cannot tell which is which")
    named: dict[int, str] = {}
    for dev, idx in zip(cuda, order, strict=True):
        g = by_index[idx]
        if dev.description.strip().lower() != g.name.strip().lower() or abs(dev.total_mib - g.total_mib) > 0.05 * g.total_mib:
            return bare, (f"{dev.name} ({dev.description}, {dev.total_mib:.0f} MiB) does not look like NVML's GPU "
                          f"{idx} ({g.name}, {g.total_mib:.0f} MiB): cannot tell which is which")
        named[idx] = dev.name
    return [replace(g, device=named.get(g.index, "")) for g in gpus], None


# ---- the decision -------------------------------------------------------------------------------------


def _reserve(g: Gpu) -> float:
    return RESERVE_MIB + RESERVE_FRACTION * g.free_mib


def usable_mib(g: Gpu) -> float:
    """What a model may fill on `g`: its room less the reserve for compute buffers and the CUDA context."""
    return max(0.0, g.free_mib - _reserve(g))


def _budgets(ask: Ask, gpus: Sequence[Gpu]) -> list[float]:
    return [usable_mib(g) - (ask.fixed_mib if i == 0 else 0.0) for i, g in enumerate(gpus)]


def _fits(ask: Ask, gpus: Sequence[Gpu], count: int, counts: Sequence[int]) -> bool:
    budgets = _budgets(ask, gpus)
    if not budgets or budgets[0] < 0:
        return False  # the first device holds the projector
    start = 0
    for budget, c in zip(budgets, counts, strict=True):
        if c and ask.run_mib(count, start, c) > budget:
            return False
        start += c
    return True


def _greedy(ask: Ask, gpus: Sequence[Gpu], count: int) -> list[int] | None:
    """Fill the devices in order, each with as many of the `count` layers as it holds; None if some are left."""
    counts, start = [], 0
    for budget in _budgets(ask, gpus):
        c = 0
        while start + c < count and ask.run_mib(count, start, c + 1) <= budget:
            c += 1
        counts.append(c)
        start += c
    return counts if start == count and _budgets(ask, gpus)[0] >= 0 else None


def _proportional(ask: Ask, gpus: Sequence[Gpu], count: int) -> list[int] | None:
    """`count` layers shared in proportion to each GPU's room (largest remainders), if that fits."""
    room = [max(0.0, b) for b in _budgets(ask, gpus)]
    total = sum(room)
    if total <= 0:
        return None
    exact = [count * r / total for r in room]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(room)), key=lambda i: exact[i] - counts[i], reverse=True)[:count - sum(counts)]:
        counts[i] += 1
    return counts if _fits(ask, gpus, count, counts) else None


def _need(ask: Ask, gpus: Sequence[Gpu], count: int, counts: Sequence[int]) -> tuple[float, ...]:
    out, start = [], 0
    for i, c in enumerate(counts):
        out.append(round(ask.run_mib(count, start, c) + RESERVE_MIB + (ask.fixed_mib if i == 0 else 0.0), 1))
        start += c
    return tuple(out)


def _placement(ask: Ask, gpus: Sequence[Gpu], counts: Sequence[int]) -> tuple[Placement, list[Gpu], list[int]]:
    # A GPU given no layers is left out, except a first one that holds the projector (it goes to the first device).
    kept = [(g, c) for i, (g, c) in enumerate(zip(gpus, counts, strict=True))
            if c > 0 or (i == 0 and ask.fixed_mib > 0)]
    used, cs = [g for g, _ in kept], [c for _, c in kept]
    return Placement(tuple(g.index for g in used), tuple(g.device for g in used),
                     tuple(cs) if len(used) > 1 else (), tuple(g.uuid for g in used)), used, cs


def place(ask: Ask, gpus: Sequence[Gpu], choice: Choice = "auto") -> Plan:
    """Where the model goes on `gpus` (room as given), among those `choice` allows."""
    pool = [g for g in allowed(choice, gpus) if g.device]
    want = ask.wanted
    if not pool or want == 0:
        why = "no layers asked on a GPU" if want == 0 else "no GPU to place on (none seen, or none the binary names)"
        return Plan("unplaced", None, want, ask.n, (), why)
    whole = ask.run_mib(want, 0, want) + ask.fixed_mib
    one = [(usable_mib(g) - whole, g.index, g) for g in pool if usable_mib(g) >= whole]
    if one:
        left, _, g = min(one, key=lambda t: (t[0], t[1]))
        return Plan("one", Placement((g.index,), (g.device,), (), (g.uuid,)), want, ask.n,
                    _need(ask, [g], want, [want]),
                    f"fits on GPU {g.index} ({g.name}): ~{whole:.0f} MiB, leaving ~{left:.0f} MiB there (best fit)")
    by_room = sorted(pool, key=lambda g: (-usable_mib(g), g.index))
    for k in range(2, len(pool) + 1):
        chosen = sorted(by_room[:k], key=lambda g: g.index)
        counts = _proportional(ask, chosen, want) or _greedy(ask, chosen, want)
        if counts is not None:
            placement, used, cs = _placement(ask, chosen, counts)
            return Plan("split", placement, want, ask.n, _need(ask, used, want, cs),
                        f"~{whole:.0f} MiB fits no single GPU (most room: ~{usable_mib(by_room[0]):.0f} MiB usable on "
                        f"GPU {by_room[0].index}): split over {placement.describe()}, in proportion to their room")
    for count in range(want - 1, 0, -1):
        counts = _greedy(ask, pool, count)
        if counts is not None:
            placement, used, cs = _placement(ask, pool, counts)
            return Plan("partial", placement, count, ask.n, _need(ask, used, count, cs),
                        f"~{whole:.0f} MiB does not fit even over every allowed GPU "
                        f"(~{sum(usable_mib(g) for g in pool):.0f} MiB usable): {count}/{ask.n} layers on "
                        f"{placement.describe()}, the rest on the CPU")
    return Plan("none", None, 0, ask.n, (), f"not one layer fits the room on GPUs {seen(pool)}")
