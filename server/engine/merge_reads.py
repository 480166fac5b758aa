"""The merge controller's work off the engine thread: the corrections a merged adapter's neighbours run on, built
from their parts, and merges prepared (``server.model.merge.prepare_merge``), each on a reader thread of its own.

A correction is cached in the slot cache like any adapter, under ``merged:<m>|<own>`` (``<own>`` empty for the base
model): uploaded names never hold ':' or '|' (the registry's NAME_PATTERN), and a mixture key (``mix:...``) as
``<own>`` is read back whole.
"""

import threading
from collections.abc import Callable

from server.adapters.checkpoint import AdapterWeights
from server.adapters.mixture import parse_mixture_key
from server.lora.prefetch import AdapterPrefetcher
from server.model.lora_model import LoraModel
from server.model.merge import PreparedMerge, correction_weights, lora_refusal, prepare_merge

CORRECTION_PREFIX = "merged:"


def correction_key(merged: str, own: str | None) -> str:
    """The slot-cache key of the correction for rows on ``own`` (None: the base model) while ``merged`` is merged."""
    return f"{CORRECTION_PREFIX}{merged}|{own or ''}"


def parse_correction_key(key: str) -> tuple[str, str | None] | None:
    """(merged, own) of a key made by ``correction_key``; None for any other key."""
    if not key.startswith(CORRECTION_PREFIX):
        return None
    merged, _, own = key[len(CORRECTION_PREFIX) :].partition("|")
    return merged, own or None


class UnfitAdapter(ValueError):
    """An adapter that can be neither merged nor corrected (DoRA, AdaLoRA); ``name`` says which."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name


def check_fit(name: str, weights: AdapterWeights) -> None:
    """Raise ``UnfitAdapter`` when ``weights`` is not a plain low-rank delta (``lora_refusal``)."""
    reason = lora_refusal(weights)
    if reason is not None:
        raise UnfitAdapter(name, reason)


def involves(key: str, name: str) -> bool:
    """Whether correction ``key`` was built from adapter ``name`` (directly or as a part of a mixture)."""
    parsed = parse_correction_key(key)
    if parsed is None:
        return False
    merged, own = parsed
    parts = parse_mixture_key(own) if own is not None else None
    return name in (merged, own) or (parts is not None and any(p.name == name for p in parts))


class MergeReads:
    """Two background readers: ``corrections`` (correction key -> its weights, built from the parts as ``read`` reads
    them: uploaded adapters and mixtures, validated host copies) and ``merges`` (adapter name -> its merge prepared,
    one at a time, on one core). A read that finds an adapter unfit fails with ``UnfitAdapter``."""

    def __init__(self, model: LoraModel, read: Callable[[str], AdapterWeights], capacity: int = 16) -> None:
        self.model = model
        self.read = read
        self.corrections: AdapterPrefetcher[AdapterWeights] = AdapterPrefetcher(self._build, capacity=capacity)
        self.merges: AdapterPrefetcher[PreparedMerge] = AdapterPrefetcher(self._prepare, capacity=1)
        self._lock = threading.Lock()  # guards _built (reader threads and deletes)
        self._built: set[str] = set()  # correction keys built so far (some may be cached in the slot cache)

    def forget(self, name: str) -> list[str]:
        """``name`` was deleted (any thread): drop every read made from it; returns the correction keys built from it,
        whose cached copies the caller drops."""
        with self._lock:
            keys = [key for key in self._built if involves(key, name)]
            self._built.difference_update(keys)
        self.merges.forget(name)
        for key in keys:
            self.corrections.forget(key)
        return keys

    def close(self) -> None:
        self.corrections.close()
        self.merges.close()

    def _prepare(self, name: str) -> PreparedMerge:
        weights = self.read(name)
        check_fit(name, weights)
        return prepare_merge(self.model, weights, single_thread=True)

    def _build(self, key: str) -> AdapterWeights:
        parsed = parse_correction_key(key)
        assert parsed is not None, f"{key!r} is not a correction key"
        merged_name, own_name = parsed
        with self._lock:
            self._built.add(key)  # before reading, so that a delete from now on reaches what this builds
        merged = self.read(merged_name)
        check_fit(merged_name, merged)
        own = None if own_name is None else self.read(own_name)
        if own is not None and own_name is not None:
            check_fit(own_name, own)
        weights = correction_weights(own, merged)
        return weights.pin_memory() if self.model.device.type == "cuda" else weights
