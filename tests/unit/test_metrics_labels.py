"""The ``adapter`` label of the metrics: reserved values that no adapter name can take, unknown adapters kept apart
from the base model, and labels of deleted adapters freed for new ones. No model is loaded."""

from types import SimpleNamespace

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.adapters.registry import InvalidAdapterName, check_name
from server.engine.stats import FinishedRecord
from server.metrics import (
    BASE_LABEL,
    DELETED_LABEL,
    MIXTURE_LABEL,
    OTHER_LABEL,
    RESERVED_LABELS,
    UNKNOWN_LABEL,
    ServerMetrics,
)


def finished(adapter: str | None, reason: str = "length") -> FinishedRecord:
    return FinishedRecord(adapter, reason, prompt_tokens=5, completion_tokens=3, queue_seconds=0.01,
                          ttft_seconds=0.02, tpot_seconds=0.003, e2e_seconds=0.05)  # fmt: skip


def requests_by_label(metrics: ServerMetrics) -> dict[tuple[str, str], float]:
    """(adapter, outcome) -> count, read from the exposition a scrape sees."""
    text = generate_latest(metrics.registry).decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "lora_requests")
    return {(s.labels["adapter"], s.labels["outcome"]): s.value for s in family.samples if s.name.endswith("_total")}


def adapter_labels_exposed(metrics: ServerMetrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    families = text_string_to_metric_families(text)
    return {s.labels["adapter"] for f in families for s in f.samples if "adapter" in s.labels}


def test_reserved_labels_can_never_be_adapter_names() -> None:
    assert {BASE_LABEL, OTHER_LABEL, UNKNOWN_LABEL, DELETED_LABEL, MIXTURE_LABEL} == RESERVED_LABELS
    for label in RESERVED_LABELS:
        with pytest.raises(InvalidAdapterName):
            check_name(label)


def test_adapters_named_base_and_other_do_not_collide() -> None:
    metrics = ServerMetrics(max_adapter_labels=2)
    metrics.observe_finished(finished(None))  # the base model
    metrics.observe_finished(finished("base"))  # an adapter that happens to be called "base"
    metrics.observe_finished(finished("other"))
    metrics.observe_finished(finished("third"))  # past the limit of 2
    assert requests_by_label(metrics) == {
        (BASE_LABEL, "length"): 1,
        ("base", "length"): 1,
        ("other", "length"): 1,
        (OTHER_LABEL, "length"): 1,
    }


def test_unknown_adapter_rejection_is_not_counted_as_base() -> None:
    """Through the API's submit(): a request naming an unregistered adapter is counted under __unknown__, and the
    name it gave never becomes a label (a client could otherwise create unbounded series)."""
    from server.api.errors import ApiError
    from server.api.generation import submit
    from server.engine.sampling_params import SamplingParams

    metrics = ServerMetrics()
    service = SimpleNamespace(registry=set(), metrics=metrics)
    for name in ("nope", "random-1", "random-2"):
        with pytest.raises(ApiError) as info:
            submit(service, [1, 2, 3], name, SamplingParams())  # type: ignore[arg-type]
        assert info.value.status == 404
    assert requests_by_label(metrics) == {(UNKNOWN_LABEL, "rejected"): 3}
    assert adapter_labels_exposed(metrics) == {UNKNOWN_LABEL}


def test_deleted_adapter_frees_its_label_and_series() -> None:
    registered = {"a", "b", "c"}
    metrics = ServerMetrics(max_adapter_labels=2, registered=registered.__contains__)
    for name in ("a", "b", "c"):
        metrics.observe_finished(finished(name))
    metrics.observe_rejected("a")
    assert requests_by_label(metrics)[(OTHER_LABEL, "length")] == 1  # c: the 2 labels are taken

    registered.discard("a")
    metrics.forget_adapter("a")
    assert "a" not in adapter_labels_exposed(metrics)  # every series of "a" is gone: counters and histograms
    metrics.observe_finished(finished("c"))
    assert requests_by_label(metrics)[("c", "length")] == 1  # the freed label went to the next adapter

    registered.add("d")
    metrics.observe_finished(finished("d"))  # the limit is reached again: d is counted under __other__
    assert requests_by_label(metrics)[(OTHER_LABEL, "length")] == 2


def test_late_finish_of_a_deleted_adapter_takes_no_label() -> None:
    """Requests of a deleted adapter finish after its label was freed (outcome adapter_deleted, or still running):
    they are counted under __deleted__ and cannot take a label back, which would leak it for good."""
    registered = {"a", "b"}
    metrics = ServerMetrics(max_adapter_labels=1, registered=registered.__contains__)
    metrics.observe_finished(finished("a"))
    registered.discard("a")
    metrics.forget_adapter("a")
    metrics.observe_finished(finished("a", "adapter_deleted"))
    metrics.observe_finished(finished("b"))
    assert requests_by_label(metrics) == {(DELETED_LABEL, "adapter_deleted"): 1, ("b", "length"): 1}


def test_forgetting_an_adapter_without_a_label_keeps_the_shared_series() -> None:
    registered = {"a", "b"}
    metrics = ServerMetrics(max_adapter_labels=1, registered=registered.__contains__)
    metrics.observe_finished(finished("a"))
    metrics.observe_finished(finished("b"))  # counted under __other__
    registered.discard("b")
    metrics.forget_adapter("b")
    assert requests_by_label(metrics) == {("a", "length"): 1, (OTHER_LABEL, "length"): 1}
