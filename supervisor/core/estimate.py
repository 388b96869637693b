"""How many layers fit in free VRAM, from a model's footprint (host/gguf.py reads it). Pure: no I/O.

llama.cpp offloads the last N repeating blocks, and the output layer as one more when N exceeds the
block count. Each offloaded block costs its weights plus its share of the KV cache; compute buffers and
the CUDA context need room beyond that, which is what the reserve is for.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
# Bytes per element of the KV cache types llama-server accepts.
CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
               "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
# Room for compute buffers and the CUDA context, beyond weights and KV cache.
RESERVE_MIB = 768.0
RESERVE_FRACTION = 0.05


@dataclass(frozen=True)
class Footprint:
    n_layers: int
    layer_mib: tuple[float, ...]  # weights of each repeating block
    output_mib: float  # output head (+ norm): the "+1" layer
    kv_mib_per_layer: float  # at the profile's ctx_size and cache types
    mmproj_mib: float

    def layer_cost(self, i: int) -> float:
        return self.layer_mib[i] + self.kv_mib_per_layer

    @property
    def mean_layer_mib(self) -> float:
        return sum(self.layer_mib) / max(1, len(self.layer_mib)) + self.kv_mib_per_layer


@dataclass(frozen=True)
class Estimate:
    layers: int  # offloadable layers that fit (n_layers + 1 means everything, output included)
    free_mib: float
    reserve_mib: float
    footprint: Footprint

    def describe(self) -> str:
        fp = self.footprint
        return (f"{self.layers}/{fp.n_layers + 1} layers fit in {self.free_mib:.0f} MiB free VRAM "
                f"(~{mib(fp.mean_layer_mib)} MiB a layer incl. KV cache, {self.reserve_mib:.0f} MiB reserved"
                + (f", projector {mib(fp.mmproj_mib)} MiB" if fp.mmproj_mib else "") + ")")


def mib(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def fit_layers(fp: Footprint, free_mib: float, *, mmproj_offload: bool = True,
               reserve_mib: float | None = None) -> Estimate:
    """The most offloadable layers (blocks from the last one backwards, then the output layer) that fit."""
    reserve = reserve_mib if reserve_mib is not None else RESERVE_MIB + RESERVE_FRACTION * free_mib
    budget = free_mib - reserve - (fp.mmproj_mib if mmproj_offload else 0.0)
    used, n = 0.0, 0
    for i in reversed(range(fp.n_layers)):
        if used + fp.layer_cost(i) > budget:
            return Estimate(n, free_mib, reserve, fp)
        used += fp.layer_cost(i)
        n += 1
    if used + fp.output_mib <= budget:
        n += 1
    return Estimate(n, free_mib, reserve, fp)


def layers_after_oom(fp: Footprint, free_mib: float, tried: int, failed_alloc_mib: float | None, *,
                     compute: bool, mmproj_offload: bool = True) -> int:
    """Layers for the next start after an out-of-memory exit with `tried` layers: the estimate, with the
    reserve grown by the compute allocation that failed, and always fewer than tried."""
    reserve = RESERVE_MIB + RESERVE_FRACTION * free_mib
    if compute and failed_alloc_mib:
        reserve = max(reserve, failed_alloc_mib + RESERVE_MIB)
    est = fit_layers(fp, free_mib, mmproj_offload=mmproj_offload, reserve_mib=reserve).layers
    return max(0, min(est, tried - 1))


def offloadable(layers: int | str, model_layers: int | None) -> int | None:
    """How many layers a setting puts on the GPU (the output layer counts as one); None when unknown."""
    total = model_layers + 1 if model_layers is not None else None
    if isinstance(layers, int):
        return min(layers, total) if total is not None else layers
    return total


def requested_offload(layers: int | str, n_layers: int) -> int | None:
    """How many layers a profile value asks for, or None for 'auto' (llama.cpp's own fitting)."""
    return None if layers == "auto" else offloadable(layers, n_layers)
