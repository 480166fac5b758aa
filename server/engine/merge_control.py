"""Serving a dominant adapter merged into the base weights, the other rows corrected (dLoRA's merged mode).

While adapter m is merged (``server.model.merge``): its rows run on ``BASE_SLOT`` (no LoRA work at all), rows on the
base model run the correction ``-s_m B_m A_m``, rows on adapter j run ``s_j B_j A_j - s_m B_m A_m`` (ranks add; a
mixture is a plain LoRA adapter here). Corrections are virtual adapters in the slot cache, cached and evicted like
any adapter, under keys no upload can take (``correction_key``); they are built on this controller's reader thread
from the parts as the engine reads them. Requests keep the slots they pinned at admission; the controller pins m's
slot and each correction slot in use once, and hands the step a slot remap (a request's slot -> the slot its tokens
use).

``before_step`` runs on the engine thread between admission and the forward pass, so a step sees weights fully
merged or fully unmerged: the policy (``merge_policy``) decides, the weights are folded or unfolded, the corrections
the step's rows need are pinned and written. Correctness comes first: when a row's correction is not resident (still
being read, no free slot or rows, a failed write, a DoRA row), the controller unmerges before the step runs (the
reads it started make the next merge possible), and it merges only once every row's correction is resident.
"""

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from server.adapters.checkpoint import AdapterWeights
from server.engine.merge_policy import MergePolicy, MergePolicyConfig
from server.engine.merge_reads import MergeReads, UnfitAdapter, correction_key
from server.engine.request import EngineRequest
from server.engine.scheduler import ScheduledRequest
from server.kernels.slots import BASE_SLOT
from server.lora.prefetch import AdapterPrefetcher
from server.lora.slot_cache import NoFreeSlotError, SlotCache
from server.model.lora_model import LoraModel
from server.model.merge import MergedWeights, StaleMergeError, apply_merge, unmerge_adapter

log = logging.getLogger(__name__)

WAITING_LOOKAHEAD = 96  # requests (running, then waiting) whose corrections are read ahead


@dataclass
class MergeStats:
    """Monotonic counters, for metrics and tests."""

    merges: int = 0
    unmerges: int = 0
    forced_unmerges: int = 0  # of the unmerges: for a row that could not be corrected, a delete or a failure
    merged_steps: int = 0  # steps that ran on merged weights
    merge_seconds: float = 0.0  # folding and unfolding weights, in all
    held_bytes: int = 0  # weights kept aside by the current merge (to restore exactly)


@dataclass
class _Merged:
    name: str
    slot: int  # m's slot, pinned by the controller: its rows run on BASE_SLOT
    weights: MergedWeights


class MergeController:
    """Merges the dominant adapter of the running batch and remaps the other rows to their corrections.

    read: the engine's adapter read (uploaded adapters and mixtures, validated host copies), run on the reader thread.
    """

    def __init__(
        self,
        model: LoraModel,
        slot_cache: SlotCache[AdapterWeights],
        read: Callable[[str], AdapterWeights],
        config: MergePolicyConfig | None = None,
        capacity: int = 16,
    ) -> None:
        self.model = model
        self.slot_cache = slot_cache
        self.policy = MergePolicy(config)
        self.stats = MergeStats()
        self.reads = MergeReads(model, read, capacity)  # corrections, and merges prepared, off the engine thread
        self._merged: _Merged | None = None
        self._preparing: str | None = None  # the adapter a merge is being prepared for (reads, pins)
        self._pins: dict[str, int] = {}  # correction key -> the slot this controller pins it in
        self._requested: set[str] = set()  # keys asked of the reader and not yet forgotten
        self._lock = threading.Lock()  # guards _deleted (any thread)
        self._deleted: set[str] = set()

    @property
    def merged(self) -> str | None:
        """The adapter merged into the base weights now, or None."""
        return self._merged.name if self._merged is not None else None

    # ---- the engine thread -----------------------------------------------------------------------------------------
    def before_step(
        self, scheduled: Sequence[ScheduledRequest], waiting: Iterable[EngineRequest]
    ) -> tuple[dict[int, int], dict[int, Exception]]:
        """Merge or unmerge as the policy says, pin the corrections this step's rows need, and do the slot writes
        admission planned (``SlotCache.make_resident``) with the corrections'. Returns the slot remap (a request's
        slot -> the slot its tokens use; empty when nothing is merged) and the failed writes (slot -> error).

        Any unmerge happens before the writes: a DoRA adapter's rescaling is taken from the base weights when its slot
        is written (``server.lora.dora``), and a DoRA row (a row without a correction) never runs merged.
        """
        self._handle_deletes()
        # The step's rows and the requests waiting to be admitted: the rows of the next steps, so a burst dominated
        # by one adapter is merged before its prompts are (prefill steps cost many decode steps each).
        rows = Counter(item.req.adapter for item in scheduled)
        rows.update(req.adapter for req in itertools.islice(waiting, WAITING_LOOKAHEAD))
        target = self.policy.observe(rows, self.merged)
        if self._merged is not None and target != self._merged.name:
            self._unmerge(forced=False)
        if self._merged is None and self._preparing not in (None, target):
            self._abandon()
        base = (self._merged.name, self._merged.slot) if self._merged is not None else None
        merging = self._merged is None and target is not None
        if merging and target is not None:
            self._preparing = target
            self._read_ahead(target, itertools.chain((item.req for item in scheduled), waiting))  # beside the packing
            base = self._candidate(target, scheduled)
        need = None if base is None else self._pin_corrections(*base, scheduled)
        if need is None and self._merged is not None:
            self._unmerge(forced=True)
        failed = self.slot_cache.make_resident()
        written = need is not None and self._written(need, failed)
        if self._merged is not None and not written:
            self._unmerge(forced=True)
        if merging and written and base is not None:
            self._merge(*base)
        if self._merged is None or need is None:
            return {}, failed
        self._read_ahead(self._merged.name, waiting)
        self.stats.merged_steps += 1
        remap = {self._merged.slot: BASE_SLOT}
        for key, slots in need.items():
            remap.update(dict.fromkeys(slots, self._pins[key]))
        return remap, failed

    def _candidate(self, name: str, scheduled: Sequence[ScheduledRequest]) -> tuple[str, int] | None:
        """(name, the slot its rows run in) once its weights are read; None while they are not (the read is started)
        or while its rows are not running in one slot (none admitted yet; a deleted copy beside a new upload)."""
        ready = self._read_ready(name, self.reads.merges)
        slots = {item.req.slot for item in scheduled if item.req.adapter == name}
        if not ready or len(slots) != 1:
            return None
        [slot] = slots
        if slot is None or self.slot_cache.resident().get(name) != slot:
            return None
        return name, slot

    def _merge(self, name: str, slot: int) -> None:
        """Fold ``name`` (prepared, every row's correction written) into the base weights and pin its slot."""
        prepared = self.reads.merges.read(name)
        self._requested.discard(name)
        start = time.perf_counter()
        try:
            merged = apply_merge(self.model, prepared)
        except StaleMergeError:  # prepared from weights that have changed since: prepare again
            return
        except Exception:  # noqa: BLE001 - serve unmerged; apply_merge restored what it had changed
            log.exception("merging adapter %r failed; it is served unmerged", name)
            self.policy.refuse(name)
            self._abandon()
            return
        self.stats.merge_seconds += time.perf_counter() - start
        self.slot_cache.reserve(name)  # a hit (resident, pinned by its rows): the controller's own pin
        self.stats.merges += 1
        self.stats.held_bytes = merged.nbytes
        self._merged, self._preparing = _Merged(name, slot, merged), None
        log.info("merged adapter %r into the base weights in %.2f s", name, time.perf_counter() - start)

    def _pin_corrections(
        self, merged: str, slot: int, scheduled: Sequence[ScheduledRequest]
    ) -> dict[str, set[int]] | None:
        """correction key -> the request slots it serves, every key pinned (writes planned on a miss), with
        ``merged`` folded in and its rows in ``slot``; None when some row cannot be corrected now (reads it needs are
        started). Pins no row needs any more are released (the corrections stay cached)."""
        need: dict[str, set[int]] = {}
        live = self.slot_cache.resident()
        for item in scheduled:
            req = item.req
            if req.adapter == merged and req.slot == slot:
                continue
            assert req.slot is not None, "a scheduled request holds a slot"
            if req.adapter is not None and (self.policy.refused(req.adapter) or live.get(req.adapter) != req.slot):
                return None  # a DoRA row, or a row on a deleted adapter's old copy: no correction is built from it
            need.setdefault(correction_key(merged, req.adapter), set()).add(req.slot)
        for key in [k for k in self._pins if k not in need]:
            self.slot_cache.release(key, self._pins.pop(key))
        return need if all([self._pin(key) for key in need]) else None  # a list: every missing read starts now

    def _written(self, need: dict[str, set[int]], failed: dict[int, Exception]) -> bool:
        """Whether every correction in ``need`` is in its slot; a failed write drops its pin."""
        for key in [k for k in need if self._pins.get(k) in failed]:
            slot = self._pins.pop(key)
            log.warning("writing correction %r failed: %s", key, failed[slot])
            self.slot_cache.release(key, slot)
        return all(key in self._pins for key in need)

    def _pin(self, key: str) -> bool:
        """Pin correction ``key`` in a slot (a device write planned on a miss); False when it is not read yet (the read
        is started), cannot be built, or finds no free slot."""
        if key in self._pins:
            return True
        if self.slot_cache.tier(key) == "disk" and not self._read_ready(key, self.reads.corrections):
            return False
        try:
            self._pins[key] = self.slot_cache.reserve(key)
        except NoFreeSlotError:
            return False
        except Exception as exc:  # noqa: BLE001 - the rows that need it run unmerged
            log.warning("correction %r could not be loaded: %s", key, exc)
            return False
        finally:
            self._requested.discard(key)  # taken by the slot cache (or failed): nothing held for it any more
        return True

    def _read_ready(self, key: str, reads: AdapterPrefetcher[Any]) -> bool:
        """Whether the read of ``key`` by ``reads`` has finished; starts it when absent. A read that failed because an
        adapter is unfit refuses that adapter; any other failure is retried on a later call."""
        state = reads.state(key)
        if state == "ready":
            return True
        if state == "failed":
            error = reads.error(key)
            self._requested.discard(key)
            if isinstance(error, UnfitAdapter):
                log.info("%s; not merging while it runs", error)
                self.policy.refuse(error.name)
            else:
                log.warning("reading %r for a merge failed: %s", key, error)
            return False
        if reads.request(key):
            self._requested.add(key)
        return False

    def _read_ahead(self, merged: str, requests: Iterable[EngineRequest]) -> None:
        """Start reading the corrections for ``requests`` (the first ``WAITING_LOOKAHEAD``) and the base model, so
        that a merge need not wait for them and an admission does not force an unmerge."""
        adapters: dict[str | None, None] = {None: None}
        for req in itertools.islice(requests, WAITING_LOOKAHEAD):
            if req.adapter != merged:
                adapters[req.adapter] = None
        for adapter in adapters:
            key = correction_key(merged, adapter)
            if key not in self._pins and key not in self._requested and self.slot_cache.tier(key) == "disk":
                if self.reads.corrections.request(key):
                    self._requested.add(key)

    def _unmerge(self, forced: bool) -> None:
        """Put the base weights back and drop the corrections' pins (they stay cached). ``forced``: for correctness
        (the policy restarts its count; reads in flight are kept for the next merge)."""
        merged, self._merged = self._merged, None
        if merged is not None:
            start = time.perf_counter()
            unmerge_adapter(self.model, merged.weights)
            self.stats.merge_seconds += time.perf_counter() - start
            self.slot_cache.release(merged.name, merged.slot)
            self.stats.unmerges += 1
            self.stats.forced_unmerges += forced
            self.stats.held_bytes = 0
            log.info("unmerged adapter %r%s", merged.name, " (forced)" if forced else "")
        if forced:
            self.policy.reset()
            self._release_pins()
        else:
            self._abandon()

    def _abandon(self) -> None:
        """Give up preparing a merge: pins back, reads in flight forgotten."""
        self._preparing = None
        self._release_pins()
        for key in self._requested:
            self.reads.corrections.forget(key)
            self.reads.merges.forget(key)
        self._requested.clear()

    def _release_pins(self) -> None:
        for key, slot in self._pins.items():
            self.slot_cache.release(key, slot)
        self._pins.clear()

    def _handle_deletes(self) -> None:
        """An adapter deleted since the last step: unmerge (corrections built from its old weights are gone)."""
        with self._lock:
            deleted, self._deleted = self._deleted, set()
        for name in deleted:
            self.policy.forget(name)
        if deleted and (self._merged is not None or self._preparing is not None):
            self._unmerge(forced=True)
            self._abandon()

    # ---- other threads ---------------------------------------------------------------------------------------------
    def forget(self, name: str) -> None:
        """``name`` was deleted (any thread): drop every correction built from it; the next step unmerges."""
        with self._lock:
            self._deleted.add(name)
        for key in self.reads.forget(name):
            self.slot_cache.invalidate(key)

    def read_correction(self, key: str) -> AdapterWeights:
        """The slot cache's read of a correction key (through the engine's read): the finished read, else built now."""
        return self.reads.corrections.read(key)

    def close(self) -> None:
        """The engine has stopped (no step runs): put the base weights back (the model may outlive the engine)."""
        self._unmerge(forced=False)
        self.reads.close()
