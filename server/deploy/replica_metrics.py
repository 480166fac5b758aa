"""One Prometheus exposition for the whole application: every engine replica's metrics, each sample labelled with
the replica it came from, plus the ingress's own view of the replicas.

Each replica pushes its exposition text (its ``ServerMetrics`` registry, the same metrics as a single server) to the
replica directory; the ingress's ``/metrics`` merges the fresh ones here. Families of the same name from different
replicas become one family (Prometheus refuses a name declared twice), told apart by the ``replica`` label.
"""

from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"
# () -> (replica id -> exposition text of the replicas heard from lately, replicas up, replicas asked for)
Snapshot = Callable[[], tuple[Mapping[str, str], int, int]]


def merge_expositions(texts: Mapping[str, str]) -> list[Metric]:
    """The families of every replica's exposition text (replica id -> text), merged by name, each sample with a
    ``replica`` label. A text that does not parse is skipped whole rather than half-merged."""
    merged: dict[str, Metric] = {}
    for replica in sorted(texts):
        try:
            families = list(text_string_to_metric_families(texts[replica]))
        except ValueError:
            continue
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                labels = {**s.labels, REPLICA_LABEL: replica}
                into.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
    return list(merged.values())


class ReplicaSetCollector(Collector):
    """Collects the merged replica metrics and ``lora_ray_replicas{state}`` from a ``Snapshot``."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        texts, up, target = self._snapshot()
        gauge = GaugeMetricFamily("lora_ray_replicas", "engine replicas: up (ready, heard from lately) and target",
                                  labels=["state"])  # fmt: skip
        gauge.add_metric(["up"], up)
        gauge.add_metric(["target"], target)
        yield gauge
        yield from merge_expositions(texts)


def registry_for(snapshot: Snapshot) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaSetCollector(snapshot))
    return registry
