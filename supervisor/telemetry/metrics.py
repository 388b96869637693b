"""Prometheus metrics of the supervisor (prometheus-client).

Every model keeps its own series (`Metrics`: its runner's and its proxy's); the box's registry (`BoxMetrics`)
collects them at scrape time with a `model` label added, next to what belongs to the box: the pool's loads and
unloads, reloads, requests refused before a model was chosen, the supervisor process, children and GPUs. One
profile is a pool of one model: the same names and labels on every box, so one dashboard serves them all."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..core.lifecycle import State

NS = "llama_supervisor"
disable_created_metrics()  # the *_created series only add noise to every scrape
GUARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


_CHILD_SERIES = (("child_rss_bytes", "rss_bytes", "Resident memory of llama-server"),
                 ("child_cpu_percent", "cpu_percent", "CPU use of llama-server, percent of one core"))


def _gpu_families() -> dict[str, GaugeMetricFamily]:
    return {
        "memory_used_mib": GaugeMetricFamily(f"{NS}_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"]),
        "memory_total_mib": GaugeMetricFamily(f"{NS}_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"]),
        "memory_free_mib": GaugeMetricFamily(f"{NS}_gpu_memory_free_bytes", "GPU memory free (NVML)",
                                             labels=["gpu", "name"]),
        "utilization_pct": GaugeMetricFamily(f"{NS}_gpu_utilization_percent", "GPU utilisation", labels=["gpu", "name"]),
        "temperature_c": GaugeMetricFamily(f"{NS}_gpu_temperature_celsius", "GPU temperature", labels=["gpu", "name"]),
    }


def _vram_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_child_vram_bytes", "GPU memory a model's llama-server holds, per GPU (NVML)",
                             labels=["model", "gpu"])


def _child_families() -> dict[str, GaugeMetricFamily]:
    return {key: GaugeMetricFamily(f"{NS}_{name}", doc, labels=["model"]) for name, key, doc in _CHILD_SERIES}


class _Sampled(Collector):
    """Series read at scrape time (each model's child RSS/CPU, the GPUs) so nothing polls when nobody scrapes.
    `sample` returns {"children": {model: {rss_bytes, cpu_percent}}, "gpus": [GPU dicts, each with "models":
    {model: MiB its child holds there}]}."""

    def __init__(self, sample: Callable[[], dict[str, Any]]) -> None:
        self._sample = sample

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """The series' names, read nothing. The registry asks at registration (for name clashes); without
        this it would call collect(), which reads /proc and NVML (importing and initialising it) on the
        event loop while the supervisor starts."""
        yield from _child_families().values()
        yield from _gpu_families().values()
        yield _vram_family()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._sample()
        children = _child_families()
        for mid, child in (s.get("children") or {}).items():
            for key, fam in children.items():
                if child.get(key) is not None:
                    fam.add_metric([mid], float(child[key]))
        yield from (f for f in children.values() if f.samples)
        gpus = s.get("gpus") or []
        if gpus:
            fams, vram = _gpu_families(), _vram_family()
            for gpu in gpus:
                for key, fam in fams.items():
                    v = gpu.get(key)
                    if v is not None:
                        fam.add_metric([str(gpu["index"]), gpu["name"]], v * 2**20 if key.startswith("memory") else v)
                for mid, mib in (gpu.get("models") or {}).items():
                    vram.add_metric([mid, str(gpu["index"])], mib * 2**20)
            yield from fams.values()
            if vram.samples:
                yield vram


def requests_counter(registry: CollectorRegistry) -> Counter:
    return Counter(f"{NS}_requests_total", "Requests by route and status (model '': refused before a model was "
                   "chosen)", ["route", "status"], registry=registry)


class Metrics:
    """One model's series (its runner's and its proxy's); the box adds the `model` label when it collects."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.state = Gauge(f"{NS}_state", "1 for the current lifecycle state", ["state"], registry=r)
        for s in State:
            self.state.labels(s.value).set(0)
        self.restarts = Counter(f"{NS}_restarts_total", "Child exits that led to a restart or failure, by cause",
                                ["cause"], registry=r)
        self.child_up = Gauge(f"{NS}_child_up", "1 when llama-server is ready", registry=r)
        self.crash_loop = Gauge(f"{NS}_crash_loop", "1 while restarts are in crash-loop backoff", registry=r)
        self.quarantined = Gauge(f"{NS}_quarantined_requests", "Requests refused as poison (crashed llama-server "
                                 "twice)", registry=r)
        self.quarantine_hits = Counter(f"{NS}_quarantine_refusals_total", "Copies of quarantined requests refused",
                                       registry=r)
        self.upstream_limit = Gauge(f"{NS}_upstream_limit", "Requests sent to llama-server at once, at most",
                                    registry=r)
        self.upstream_waiting = Gauge(f"{NS}_upstream_waiting", "Requests waiting for an upstream slot", registry=r)
        self.climbs = Counter(f"{NS}_climbs_total", "Restarts to higher settings after the VRAM estimate", registry=r)
        self.streams_resumed = Counter(f"{NS}_streams_resumed_total", "Streams cut by a child's end and completed "
                                       "on the next child (a continuation of the answer)", registry=r)
        self.loop_latency = Gauge(f"{NS}_loop_latency_seconds", "Round trip of the last probe through llama-server's "
                                  "inference loop (GET /slots or /metrics)", registry=r)
        self.loop_probes = Counter(f"{NS}_loop_probes_total", "Liveness probe rounds by outcome (alive, excused, "
                                   "failed, wedged)", ["outcome"], registry=r)
        self.load_seconds = Gauge(f"{NS}_load_seconds", "Seconds from spawn to /health 200, last start", registry=r)
        self.warmup_seconds = Gauge(f"{NS}_warmup_seconds", "Seconds of the warmup request, last start", registry=r)
        self.gpu_layers = Gauge(f"{NS}_effective_gpu_layers", "GPU layers the child runs with (-1: auto/all)",
                                registry=r)
        self.ctx_size = Gauge(f"{NS}_effective_ctx_size", "Context size the child runs with", registry=r)
        self.requests = requests_counter(r)
        self.latency = Histogram(f"{NS}_request_seconds", "Proxied request duration (to the last byte)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(f"{NS}_in_flight", "Proxied requests in progress", registry=r)
        self.queued = Gauge(f"{NS}_queued", "Requests waiting for the model to load or its child to be ready",
                            registry=r)
        self.queue_wait = Histogram(f"{NS}_queue_wait_seconds", "Time requests waited for a load or readiness",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(f"{NS}_tokens_total", "Tokens reported by llama-server in responses", ["kind"],
                              registry=r)
        self.images = Counter(f"{NS}_images_total", "Images checked by the proxy", registry=r)
        self.image_bytes = Counter(f"{NS}_image_bytes_total", "Image bytes before (in) and after (out) the proxy",
                                   ["direction"], registry=r)
        self.images_dropped = Counter(f"{NS}_images_dropped_total",
                                      "Images the context guard replaced by a placeholder", registry=r)
        self.turns_dropped = Counter(f"{NS}_turns_dropped_total", "Conversation turns the context guard left out",
                                     registry=r)
        self.context_tokens_saved = Counter(f"{NS}_context_tokens_saved_total",
                                            "Prompt tokens the context guard's trimming saved", registry=r)
        self.context_seconds = Histogram(f"{NS}_context_seconds", "Time the context guard took per chat request "
                                         "(counting, planning, re-serialising)", buckets=GUARD_BUCKETS, registry=r)
        self.context_checks = Counter(f"{NS}_context_checks_total", "Chat requests the context guard looked at, "
                                      "by how it decided", ["outcome"], registry=r)

    def set_state(self, state: State, crash_loop: bool = False) -> None:
        for s in State:
            self.state.labels(s.value).set(1 if s is state else 0)
        self.child_up.set(1 if state is State.READY else 0)
        self.crash_loop.set(1 if crash_loop else 0)


class _PerModel(Collector):
    """Each model's registry (and the front's), collected at scrape time, one family per name with `model` added."""

    def __init__(self, models: dict[str, Metrics], front: CollectorRegistry) -> None:
        self.models, self.front = models, front

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for mid, registry in [*((m, x.registry) for m, x in list(self.models.items())), ("", self.front)]:
            for fam in registry.collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {"model": mid, **s.labels}, s.value, s.timestamp, s.exemplar)
        yield from families.values()


class BoxMetrics:
    """The box's registry: what /metrics serves."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.models: dict[str, Metrics] = {}
        front = CollectorRegistry(auto_describe=True)
        self.front_requests = requests_counter(front)  # refused before a model was chosen (401, 404, 413)
        r.register(_PerModel(self.models, front))
        # The supervisor's own RSS and CPU (llama_supervisor_process_*), once for the box.
        ProcessCollector(namespace=NS, registry=r)
        self.swaps = Counter(f"{NS}_model_loads_total", "Models loaded, by what asked for it (request, start, "
                             "pinned, preload, admin)", ["model", "cause"], registry=r)
        self.evictions = Counter(f"{NS}_model_unloads_total",
                                 "Models unloaded, by reason (lru, ttl, oom, drain, admin, reload)",
                                 ["model", "reason"], registry=r)
        self.reloads = Counter(f"{NS}_reloads_total", "Profile reloads by outcome (per model: restart, update, "
                               "unchanged; per file: invalid)", ["outcome"], registry=r)
        self.upgrades = Counter(f"{NS}_upgrades_total", "llama-server upgrades by outcome: switched (passed its "
                                "canary), rejected (failed it, or died on probation: rolled back), good (probation "
                                "over); dry runs are not counted", ["model", "outcome"], registry=r)
        self.upgrade_failed = Gauge(f"{NS}_upgrade_failed_check", "1 for each check the last rejected candidate "
                                    "failed (the model serves its last good build); cleared when a build becomes "
                                    "good", ["model", "check"], registry=r)

    def for_model(self, mid: str) -> Metrics:
        m = self.models.get(mid)
        if m is None:
            m = self.models[mid] = Metrics()
        return m

    def forget(self, mid: str) -> None:
        self.models.pop(mid, None)

    def attach_sampler(self, sample: Callable[[], dict[str, Any]]) -> None:
        """Children and GPUs, read at scrape time."""
        self.registry.register(_Sampled(sample))
