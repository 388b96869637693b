"""Metrics of a box serving several models: every model's own series (its runner's and its proxy's, the same
names as with one model) gain a `model` label, and the pool adds swaps, evictions and waiting requests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .metrics import NS, Metrics


class _PerModel(Collector):
    """Each model's registry, collected at scrape time, one family per name with a `model` label added."""

    def __init__(self, models: dict[str, Metrics]) -> None:
        self.models = models

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for mid, metrics in list(self.models.items()):
            for fam in metrics.registry.collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {"model": mid, **s.labels}, s.value, s.timestamp, s.exemplar)
        yield from families.values()


class PoolMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.models: dict[str, Metrics] = {}
        r.register(_PerModel(self.models))
        self.swaps = Counter(f"{NS}_model_loads_total", "Models loaded, by what asked for it (request, start, pinned, preload, admin)",
                             ["model", "cause"], registry=r)
        self.evictions = Counter(f"{NS}_model_unloads_total",
                                 "Models unloaded, by reason (lru, ttl, oom, drain, admin, reload)",
                                 ["model", "reason"], registry=r)
        self.queued = Gauge(f"{NS}_model_waiting", "Requests waiting for a model to be loaded", ["model"],
                            registry=r)

    def for_model(self, mid: str) -> Metrics:
        m = self.models.get(mid)
        if m is None:
            m = self.models[mid] = Metrics()
        return m

    def attach_sampler(self, sample: Callable[[], dict[str, Any]]) -> None:
        """GPU series once for the box (not per model)."""
        from .metrics import _Sampled

        self.registry.register(_Sampled(sample))
