"""Every Prometheus metric the server exports, defined in one place.

Label cardinality is bounded: the ``adapter`` label takes at most ``max_adapter_labels`` distinct names of registered
adapters at a time (the first ones seen). Deleting an adapter frees its label (its series are removed), so a later
adapter can take it. Everything else gets a reserved label, which starts with "_" and so can never be an adapter
name (names start with a letter or digit): ``__base__`` (no adapter), ``__other__`` (adapters past the limit),
``__unknown__`` (requests naming an adapter that is not registered: their names never become labels, or a client
could make unbounded series), ``__deleted__`` (requests of an adapter that finished after it was deleted) and
``__mixture__`` (requests on a weighted mixture of adapters, whatever its parts and weights).
Outcome and tier labels come from fixed sets.
"""

import threading
from collections.abc import Callable, Iterable
from contextlib import suppress

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.adapters.mixture import MIXTURE_PREFIX
from server.engine.stats import FinishedRecord, MemoryStats
from server.lora.slot_cache import CacheStats

BASE_LABEL = "__base__"
OTHER_LABEL = "__other__"
UNKNOWN_LABEL = "__unknown__"
DELETED_LABEL = "__deleted__"
MIXTURE_LABEL = "__mixture__"  # every weighted mixture (its key holds client-chosen weights: one label for them all)
RESERVED_LABELS = frozenset({BASE_LABEL, OTHER_LABEL, UNKNOWN_LABEL, DELETED_LABEL, MIXTURE_LABEL})
REJECTED = "rejected"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class AdapterLabels:
    """Maps adapter names to a bounded set of label values (the caller serialises calls: ServerMetrics' lock).

    ``registered(name)`` says whether an adapter is registered now: only registered adapters take a free label, so
    requests that finish after their adapter was deleted (and its label released) cannot take one back for good.
    """

    def __init__(self, limit: int, registered: Callable[[str], bool] = lambda name: True) -> None:
        self.limit = limit
        self._registered = registered
        self._known: set[str] = set()

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        if adapter in self._known:
            return adapter
        if adapter.startswith(MIXTURE_PREFIX):
            return MIXTURE_LABEL
        if not self._registered(adapter):
            return DELETED_LABEL
        if len(self._known) < self.limit:
            self._known.add(adapter)
            return adapter
        return OTHER_LABEL

    def release(self, adapter: str) -> bool:
        """Free ``adapter``'s label; True when it had one (False when it was counted under a reserved label)."""
        if adapter in self._known:
            self._known.discard(adapter)
            return True
        return False


class ServerMetrics:
    """``registered(name)``: whether an adapter is registered now (the registry's ``__contains__``); without it,
    every adapter counts as registered."""

    def __init__(self, max_adapter_labels: int = 100, registered: Callable[[str], bool] = lambda name: True) -> None:
        self.registry = CollectorRegistry()
        self.label = AdapterLabels(max_adapter_labels, registered)
        # One lock around choosing a label and updating its series, so that releasing a label cannot interleave
        # with an observation and leave a series behind for a label nobody holds.
        self._lock = threading.Lock()
        self._outcomes: dict[str, set[str]] = {}  # adapter label -> outcomes it has series for (to remove them)
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
        with self._lock:
            adapter = self.label(record.adapter)
            self._count(adapter, record.finish_reason)
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
        """A request for the base model (None) or a registered adapter refused at submission (limits, full queue)."""
        with self._lock:
            self._count(self.label(adapter), REJECTED)

    def observe_rejected_unknown(self) -> None:
        """A request naming an adapter that is not registered (404); the name is not used as a label."""
        with self._lock:
            self._count(UNKNOWN_LABEL, REJECTED)

    def forget_adapter(self, name: str) -> None:
        """``name`` was deleted: remove its series and free its label for the next adapter. Prometheus then sees
        the series end (increments since the last scrape are lost to ``rate()``); the stored history stays."""
        with self._lock:
            if not self.label.release(name):
                return
            for outcome in self._outcomes.pop(name, set()):
                with suppress(KeyError):
                    self.requests.remove(name, outcome)
            for metric in (self.queue_seconds, self.ttft, self.tpot, self.e2e, self.prompt_tokens,
                           self.generated_tokens):  # fmt: skip
                with suppress(KeyError):
                    metric.remove(name)

    def _count(self, adapter: str, outcome: str) -> None:
        self.requests.labels(adapter, outcome).inc()
        self._outcomes.setdefault(adapter, set()).add(outcome)

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
        memory: Callable[[], MemoryStats] | None = None,
    ) -> None:
        self.running, self.queued, self.cache_stats = running, queued, cache_stats
        self.resident, self.registered, self.memory = resident, registered, memory


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
        if v.memory is not None:
            yield from _memory_families(v.memory())


def _memory_families(m: MemoryStats) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    blocks = GaugeMetricFamily("lora_kv_blocks", "Paged KV cache blocks by state", labels=["state"])
    for state, value in (("used", m.kv_blocks_used), ("cached", m.kv_blocks_cached), ("free", m.kv_blocks_free)):
        blocks.add_metric([state], value)
    yield blocks
    yield GaugeMetricFamily("lora_kv_block_bytes", "Bytes of one KV block (layers, K, V)", value=m.kv_block_bytes)
    yield CounterMetricFamily(
        "lora_prefix_cache_hit_tokens", "Tokens whose K/V came from the prefix cache", value=m.prefix_hit_tokens
    )
    yield CounterMetricFamily("lora_preemptions", "Running requests preempted for KV blocks", value=m.preemptions)
    merges = CounterMetricFamily("lora_dominant_merges", "Dominant adapters folded into the base weights and back",
                                 labels=["event"])  # fmt: skip
    merges.add_metric(["merge"], m.dominant_merges)
    merges.add_metric(["unmerge"], m.dominant_unmerges)
    yield merges
    pool = GaugeMetricFamily("lora_adapter_pool_bytes", "Adapter weights on the accelerator", labels=["state"])
    pool.add_metric(["used"], m.adapter_pool_bytes_used)
    pool.add_metric(["total"], m.adapter_pool_bytes_total)
    yield pool
