"""Every Prometheus metric the server exports, defined in one place.

Label cardinality is bounded: the ``adapter`` label takes at most ``max_adapter_labels`` distinct adapter names
(the first ones seen); every later adapter is reported as ``other``, and the base model as ``base``. Outcome and
tier labels come from fixed sets.
"""

import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.stats import FinishedRecord
from server.lora.slot_cache import CacheStats

BASE_LABEL = "base"
OTHER_LABEL = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class AdapterLabels:
    """Maps adapter names to a bounded set of label values."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._known:
                return adapter
            if len(self._known) < self.limit:
                self._known.add(adapter)
                return adapter
        return OTHER_LABEL


class ServerMetrics:
    def __init__(self, max_adapter_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.label = AdapterLabels(max_adapter_labels)
        r = self.registry
        self.requests = Counter("lora_requests", "Requests by adapter and outcome", ["adapter", "outcome"], registry=r)
        self.queue_seconds = Histogram(
            "lora_request_queue_seconds", "Arrival to admission", ["adapter"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "lora_time_to_first_token_seconds", "Arrival to first token", ["adapter"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "lora_time_per_output_token_seconds", "Mean time per output token after the first", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "lora_request_e2e_seconds", "Arrival to finish", ["adapter"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("lora_prompt_tokens", "Prompt tokens by adapter", ["adapter"], registry=r)
        self.generated_tokens = Counter("lora_generated_tokens", "Generated tokens by adapter", ["adapter"], registry=r)
        self.step_tokens = Histogram("lora_step_tokens", "Tokens per engine step", buckets=_TOKEN_BUCKETS, registry=r)

    def observe_finished(self, record: FinishedRecord) -> None:
        adapter = self.label(record.adapter)
        self.requests.labels(adapter, record.finish_reason).inc()
        self.prompt_tokens.labels(adapter).inc(record.prompt_tokens)
        self.generated_tokens.labels(adapter).inc(record.completion_tokens)
        for histogram, value in (
            (self.queue_seconds, record.queue_seconds),
            (self.ttft, record.ttft_seconds),
            (self.tpot, record.tpot_seconds),
            (self.e2e, record.e2e_seconds),
        ):
            if value is not None:
                histogram.labels(adapter).observe(value)

    def observe_rejected(self, adapter: str | None) -> None:
        self.requests.labels(self.label(adapter), "rejected").inc()

    def observe_step(self, num_tokens: int) -> None:
        if num_tokens:
            self.step_tokens.observe(num_tokens)

    def add_engine_view(self, view: "EngineView") -> None:
        """Gauges and cache counters read from the engine at scrape time."""
        self.registry.register(_EngineCollector(view))


class EngineView:
    """What the scrape-time collector reads: plain callables, so this module does not depend on the engine's shape."""

    def __init__(
        self,
        running: Callable[[], int],
        queued: Callable[[], int],
        cache_stats: Callable[[], CacheStats],
        resident: Callable[[], tuple[int, int]],  # (adapters in slots, host copies in the CPU tier)
        registered: Callable[[], int],
    ) -> None:
        self.running, self.queued, self.cache_stats = running, queued, cache_stats
        self.resident, self.registered = resident, registered


class _EngineCollector(Collector):
    def __init__(self, view: EngineView) -> None:
        self.view = view

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        v = self.view
        yield GaugeMetricFamily("lora_running_requests", "Sequences in the running batch", value=v.running())
        yield GaugeMetricFamily("lora_queue_length", "Requests waiting for admission", value=v.queued())
        stats = v.cache_stats()
        for name, value, doc in (
            ("lora_adapter_cache_hits", stats.hits, "Adapter already in a slot"),
            ("lora_adapter_cache_misses", stats.misses, "Adapter had to be loaded into a slot"),
            ("lora_adapter_cache_loads", stats.loads, "Adapter reads from disk"),
            ("lora_adapter_cache_evictions", stats.evictions, "Adapters evicted from a slot"),
            ("lora_adapter_load_seconds", stats.load_seconds, "Time spent reading and writing adapters"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        resident = GaugeMetricFamily("lora_adapters_resident", "Adapters resident per tier", labels=["tier"])
        slots, host = v.resident()
        resident.add_metric(["gpu"], slots)
        resident.add_metric(["cpu"], host)
        yield resident
        yield GaugeMetricFamily("lora_adapters_registered", "Adapters in the registry", value=v.registered())
