"""Which models stay loaded: decide(view, rules, now) → actions. Pure: no I/O, no clock.

The pool describes the box as data — every model with its state, what it needs (measured once it ran,
estimated before), its requests in flight, pinned/ttl and when it was last used; the free memory per GPU
and the host RAM budget; the groups of requests waiting for a model that is not loaded — and carries out
the actions this returns. The rules:

- a model that fits next to the loaded ones is loaded; otherwise idle, unpinned models are unloaded in
  least-recently-used order until it fits;
- a model with requests in flight is never unloaded: it is drained first (new requests for it wait), and
  only once the group that needs the room has been passed over for `pass_over_s`; until then requests for
  loaded models proceed and the waiting group waits (this is what stops two models from thrashing: every
  request that arrived for the unloaded model is served by the one swap);
- one load at a time, the oldest waiting group first;
- a model that does not fit in the GPUs even alone still loads once everything else that can go is gone:
  the out-of-memory ladder fits it; one that cannot fit the host RAM budget even alone is refused;
- after an out-of-memory exit, idle others are unloaded and the same settings tried again (`after_oom`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from .estimate import RESERVE_MIB, Footprint
from .placement import Ask, Choice, Gpu, Plan, allowed, place

# What a llama-server process holds in host RAM beyond weights and KV cache (the binary, buffers, threads);
# the measurement replaces the estimate once the model ran.
HOST_OVERHEAD_MIB = 64.0


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"  # a child is starting (or restarting) for it
    LOADED = "loaded"  # ready, serving
    DRAINING = "draining"  # going away: no new requests, unloaded once the ones in flight are done
    FAILED = "failed"  # its lifecycle gave up (crash loop, bad model); an explicit load tries again


RESIDENT = frozenset({ModelState.LOADING, ModelState.LOADED, ModelState.DRAINING})


@dataclass(frozen=True)
class Mem:
    """Memory a model holds or needs: MiB on each GPU (by NVML index) and MiB of host RAM."""

    gpu_mib: tuple[float, ...] = ()
    host_mib: float = 0.0

    def gpu(self, device: int) -> float:
        return self.gpu_mib[device] if device < len(self.gpu_mib) else 0.0


@dataclass(frozen=True)
class Placing:
    """What placing a model on the GPUs needs (several GPUs, core/placement.py)."""

    ask: Ask  # its layers' costs at its settings
    choice: Choice = "auto"  # the profile's `gpus`
    devices: tuple[str, ...] = ()  # its binary's name for each GPU, by NVML index ("": none)


@dataclass(frozen=True)
class Model:
    id: str
    state: ModelState
    need: Mem  # measured once the model ran (`measured`), the estimate before
    measured: bool = False
    in_flight: int = 0
    pinned: bool = False
    ttl_s: float = 0.0  # unload after this idle time; 0: never
    last_used: float = 0.0  # monotonic time of the last request's end (or of the load)
    draining_for: str = ""  # why a DRAINING model goes: the reason its unload will carry
    placing: Placing | None = None  # unloaded, on a box whose GPUs are named: where it would go decides the room


@dataclass(frozen=True)
class Demand:
    """Requests waiting for a model that is not loaded (count 0: a load asked for without a request)."""

    model: str
    count: int
    since: float  # when the oldest of them began waiting


@dataclass(frozen=True)
class Room:
    gpu_free_mib: tuple[float, ...] = ()  # NVML's free memory per GPU now (loaded children already subtracted)
    host_budget_mib: float | None = None  # memory_budget_mib: host RAM all children together may use
    host_available_mib: float | None = None  # MemAvailable from /proc/meminfo
    gpus: tuple[Gpu, ...] = ()  # every GPU with its free memory (names come from each model's Placing)


@dataclass(frozen=True)
class View:
    models: tuple[Model, ...]
    room: Room
    demands: tuple[Demand, ...] = ()


@dataclass(frozen=True)
class Rules:
    pass_over_s: float = 5.0  # how long a waiting group may be passed over before busy models are drained
    wait_s: float = 120.0  # how long a group may wait in all before its requests get a 503


def estimate_need(fp: Footprint | None, model_mib: float, mmproj_mib: float, gpu_layers: int | None, *,
                  on_gpu: bool) -> Mem:
    """What a model will hold before it ever ran: the offloaded blocks (last ones first, then the output
    layer), their KV cache, the projector and a compute reserve on GPU 0; the rest of the weights and KV
    cache in host RAM. `gpu_layers` None means all; `on_gpu` False (no GPU, CPU only) puts it all on the host."""
    if fp is None:
        return Mem((), model_mib + mmproj_mib + HOST_OVERHEAD_MIB)
    kv_all = fp.kv_mib_per_layer * fp.n_layers
    if not on_gpu or gpu_layers == 0:
        return Mem((), model_mib + mmproj_mib + kv_all + HOST_OVERHEAD_MIB)
    n = fp.n_layers + 1 if gpu_layers is None else min(gpu_layers, fp.n_layers + 1)
    blocks = range(max(0, fp.n_layers - n), fp.n_layers)
    weights = sum(fp.layer_mib[i] for i in blocks) + (fp.output_mib if n > fp.n_layers else 0.0)
    kv = fp.kv_mib_per_layer * len(blocks)
    gpu = weights + kv + fp.mmproj_mib + RESERVE_MIB
    host = max(0.0, model_mib - weights) + (kv_all - kv) + HOST_OVERHEAD_MIB
    return Mem((round(gpu, 1),), round(host, 1))


# ---- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    model: str
    plan: Plan | None = None  # where it goes (several GPUs), in the room the unloads before it leave


@dataclass(frozen=True)
class Unload:
    model: str
    reason: str  # lru | ttl | oom | drain | admin | reload — a metrics label
    detail: str  # for people


@dataclass(frozen=True)
class Drain:
    """Stop admitting requests to `model`; it is unloaded (with `reason`) once those in flight are done."""

    model: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Wait:
    model: str
    detail: str


@dataclass(frozen=True)
class Reject:
    """Answer the requests waiting for `model` with a 503 (Retry-After)."""

    model: str
    detail: str


Action = Load | Unload | Drain | Wait | Reject


# ---- the decision -------------------------------------------------------------------------------


def _resident(models: Iterable[Model], gone: set[str]) -> list[Model]:
    return [m for m in models if m.state in RESIDENT and m.id not in gone]


def gpu_fits(need: Mem, room: Room, freed: Sequence[Model]) -> bool:
    for d, want in enumerate(need.gpu_mib):
        if want <= 0 or d >= len(room.gpu_free_mib):
            continue  # nothing asked on this GPU, or no NVML figure to hold it against
        if want > room.gpu_free_mib[d] + sum(m.need.gpu(d) for m in freed):
            return False
    return True


def host_fits(need: Mem, room: Room, resident: Sequence[Model], freed: Sequence[Model]) -> bool:
    gone = {m.id for m in freed}
    if room.host_budget_mib is not None:
        used = sum(m.need.host_mib for m in resident if m.id not in gone)
        if used + need.host_mib > room.host_budget_mib:
            return False
    return room.host_available_mib is None or (
        need.host_mib <= room.host_available_mib + sum(m.need.host_mib for m in freed))


def decide(view: View, rules: Rules, now: float) -> list[Action]:
    models = {m.id: m for m in view.models}
    wanted = {d.model for d in view.demands}
    acts: list[Action] = []
    gone: set[str] = set()
    for m in view.models:
        if m.state is ModelState.DRAINING and m.in_flight == 0:
            acts.append(Unload(m.id, m.draining_for or "drain", "drained"))
            gone.add(m.id)
        elif (m.state is ModelState.LOADED and m.in_flight == 0 and not m.pinned and m.ttl_s > 0
              and now - m.last_used >= m.ttl_s and m.id not in wanted):
            acts.append(Unload(m.id, "ttl", f"idle for {now - m.last_used:.0f}s (ttl_s {m.ttl_s:g})"))
            gone.add(m.id)
    pending: list[Demand] = []
    for d in view.demands:
        target = models.get(d.model)
        if target is None:
            acts.append(Reject(d.model, f"model '{d.model}' is no longer offered"))
        elif target.state is ModelState.FAILED:
            acts.append(Reject(d.model, f"model '{d.model}' failed to start"))
        elif now - d.since >= rules.wait_s:
            acts.append(Reject(d.model, f"waited {now - d.since:.0f}s for memory to load '{d.model}'"))
        elif target.state is ModelState.UNLOADED:
            pending.append(d)
    if not pending or any(m.state is ModelState.LOADING for m in view.models):
        return acts  # one load at a time: memory figures are in flux while a model loads
    first = min(pending, key=lambda d: d.since)
    return acts + _make_room(view, models[first.model], first, rules, now, gone)


@dataclass(frozen=True)
class Preview:
    """What loading a model now would do: where it goes, what is unloaded for it, what it waits for."""

    model: str
    plan: Plan | None  # where on the GPUs (several GPUs, named); None: no placement decided here
    need: Mem  # memory expected per GPU (NVML index) and in host RAM
    unload: tuple[str, ...] = ()  # idle (or draining, done) models that go first
    wait_for: tuple[str, ...] = ()  # models with requests in flight it waits for (drained first)
    refused: str | None = None  # why it cannot be loaded at all


def _placed(target: Model, room: Room, freed: Sequence[Model]) -> Plan | None:
    """Where `target` goes in `room` once `freed` are gone (None: it does not place on GPUs here)."""
    pl = target.placing
    if pl is None or not room.gpus:
        return None
    gpus = [replace(g, free_mib=g.free_mib + sum(m.need.gpu(g.index) for m in freed),
                    device=pl.devices[g.index] if g.index < len(pl.devices) else "") for g in room.gpus]
    plan = place(pl.ask, gpus, pl.choice)
    return None if plan.kind == "unplaced" else plan


def _on(m: Model, gpus: set[int] | None) -> bool:
    """Does `m` hold memory on one of `gpus` (None: any GPU)?"""
    return any(mib > 0 and (gpus is None or d in gpus) for d, mib in enumerate(m.need.gpu_mib))


def preview(view: View, target: Model, gone: set[str] | frozenset[str] = frozenset()) -> Preview:
    """The room `target` needs, made the cheapest way: models already going first, then idle ones, then busy
    ones, least recently used first, and (several GPUs) only models on GPUs it may use. `gone`: unloads already
    decided. Pure; the /plan endpoint asks it too, without doing anything."""
    room, need = view.room, target.need
    resident = _resident(view.models, set())
    freed = [m for m in view.models if m.id in gone]
    others = [m for m in resident if m.id != target.id and not m.pinned and m.id not in gone]
    draining = [m for m in others if m.state is ModelState.DRAINING]
    idle = sorted((m for m in others if m.state is ModelState.LOADED and m.in_flight == 0), key=lambda m: m.last_used)
    busy = sorted((m for m in others if m.state is ModelState.LOADED and m.in_flight > 0), key=lambda m: m.last_used)
    mine = ({g.index for g in allowed(target.placing.choice, room.gpus)}
            if target.placing is not None and room.gpus else None)

    def fits(extra: list[Model]) -> tuple[bool, bool, Plan | None]:
        plan = _placed(target, room, freed + extra)
        on_gpu = plan.whole if plan is not None else gpu_fits(need, room, freed + extra)
        return on_gpu, host_fits(need, room, resident, freed + extra), plan

    chosen: list[Model] = []
    gpu_ok, host_ok, plan = fits(chosen)
    for m in draining + idle + busy:
        if gpu_ok and host_ok:
            break
        if (not host_ok and m.need.host_mib > 0) or (not gpu_ok and _on(m, mine)):
            chosen.append(m)
            gpu_ok, host_ok, plan = fits(chosen)
    if plan is not None and gpu_ok and host_ok:
        # Several GPUs: an unload that freed a GPU the model did not end up on was for nothing. Keep those.
        for m in reversed(list(chosen)):
            rest = [x for x in chosen if x is not m]
            g_ok, h_ok, p = fits(rest)
            if g_ok and h_ok:
                chosen, plan = rest, p
    if plan is not None:
        need = Mem(tuple(dict(zip(plan.placement.gpus, plan.need_mib, strict=True)).get(i, 0.0)
                         for i in range(max(plan.placement.gpus) + 1)) if plan.placement else (), need.host_mib)
    refused = None
    if not host_ok:
        refused = (f"'{target.id}' needs ~{need.host_mib:.0f} MiB of host RAM: it cannot fit memory_budget_mib "
                   f"{room.host_budget_mib:g} even with every unpinned model unloaded"
                   if room.host_budget_mib is not None else
                   f"'{target.id}' needs ~{need.host_mib:.0f} MiB of host RAM, more than is available")
    # If the GPUs cannot hold it even so, it loads once all of those are gone: the ladder fits it.
    waiting = tuple(m.id for m in chosen if m.state is ModelState.DRAINING or m.in_flight > 0)
    return Preview(target.id, plan, need, tuple(m.id for m in chosen if m.id not in waiting), waiting, refused)


def _make_room(view: View, target: Model, demand: Demand, rules: Rules, now: float, gone: set[str]) -> list[Action]:
    pv = preview(view, target, gone)
    if pv.refused is not None:
        return [Reject(target.id, pv.refused)]
    if not pv.wait_for:
        evicted = [Unload(m, "lru", f"evicted for '{target.id}' (least recently used, idle)") for m in pv.unload]
        return [*evicted, Load(target.id, pv.plan)]
    models = {m.id: m for m in view.models}
    names = ", ".join(f"'{m}'" for m in pv.wait_for)
    if now - demand.since >= rules.pass_over_s:
        acts: list[Action] = [Drain(m, "lru", f"drained for '{target.id}' ({demand.count} waiting "
                                              f"{now - demand.since:.1f}s)") for m in pv.wait_for
                              if models[m].in_flight > 0 and models[m].state is ModelState.LOADED]
        return [*acts, Wait(target.id, f"waiting for {names} to finish the requests in flight")]
    return [Wait(target.id, f"{names} busy; requests for loaded models go first for up to {rules.pass_over_s:g}s")]


def after_oom(view: View, model: str, on: frozenset[int] | None = None) -> list[Unload]:
    """An out-of-memory exit of `model` while others are loaded: unload the idle, unpinned ones so the same
    settings can be tried again before the ladder lowers them. Empty: nothing to free, the ladder goes on.
    `on`: the GPUs that ran out (several GPUs): only models holding memory there are unloaded."""
    idle = sorted((m for m in view.models if m.id != model and m.state is ModelState.LOADED and m.in_flight == 0
                   and not m.pinned and (on is None or _on(m, set(on)))), key=lambda m: m.last_used)
    return [Unload(m.id, "oom", f"freed for '{model}' after its out-of-memory exit") for m in idle]
