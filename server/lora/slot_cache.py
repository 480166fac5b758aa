"""Which adapter sits in which accelerator slot: LRU slots with pinning, a bounded CPU tier, disk behind both.

Tiers, fastest first: the accelerator's adapter pool, an LRU of at most ``cpu_capacity`` host copies, and disk (the
``AdapterSource``), the source of truth. The pool holds adapters at their true rank: each resident adapter has a
slot (``adapter_slots``, at most ``num_slots``; ``BASE_SLOT`` is never used here) and a contiguous range of rank
rows (``RowAllocator``, the backend's ``pool_rows`` in all), so residency is decided by rows (bytes) and by slot
count. A running request pins the slot it got from ``reserve`` and unpins it with ``release``; a pinned adapter is
never evicted or overwritten (compaction may move its rows: that happens between steps, on the engine thread).

Deciding and writing are apart: ``reserve`` (the scheduler's admission) picks and pins the slot, evicts and compacts
(clears and row moves are small device copies), and plans the device write; ``make_resident`` (the engine, before
the step runs) does the planned writes through the backend.

A miss reads and validates the new adapter before it evicts anything, so a bad adapter costs the cache nothing, and
eviction clears the slot so that no stale weights linger on the device. Torch-free: the weights type ``W`` is opaque
here and only the injected ``SlotBackend`` touches the device.
"""

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from server.kernels.slots import adapter_slots
from server.lora.row_allocator import RowAllocator


class NoFreeSlotError(RuntimeError):
    """Running requests pin every slot, or so many pool rows that the adapter cannot fit; wait and retry."""


W = TypeVar("W")  # the host copy of an adapter's weights, opaque here
W_co = TypeVar("W_co", covariant=True)
W_contra = TypeVar("W_contra", contravariant=True)


class AdapterSource(Protocol[W_co]):
    def read(self, name: str) -> W_co:
        """Read and validate adapter ``name`` from disk; raises ``AdapterError`` when it cannot be served."""


class SlotBackend(Protocol[W_contra]):
    """The device side of the adapter pool: ``pool_rows`` rank rows per wrapped layer, ``bytes_per_row`` bytes each
    (summed over the layers)."""

    @property
    def pool_rows(self) -> int: ...

    @property
    def bytes_per_row(self) -> int: ...

    def rows_of(self, weights: W_contra) -> int:
        """Pool rows an adapter takes in every layer: its largest rank over the modules it adapts."""

    def write_slot(self, slot: int, weights: W_contra, offset: int) -> None:
        """Copy host ``weights`` into ``slot``, its rows at ``offset .. offset + rows_of(weights) - 1``."""

    def clear_slot(self, slot: int) -> None:
        """Empty ``slot`` (the ops no longer read its rows)."""

    def move_slot(self, slot: int, offset: int) -> None:
        """Move ``slot``'s rows down to start at ``offset`` (compaction; an empty slot has nothing to move)."""


@dataclass
class CacheStats:
    """Monotonic counters, read by the metrics exporter."""

    hits: int = 0  # acquire found the adapter already in a slot
    misses: int = 0  # acquire had a free or evictable slot and read the adapter (failed loads, and reserves then
    # refused because pinned adapters hold the rows, included)
    cpu_hits: int = 0  # a miss served from the CPU tier (no disk read)
    loads: int = 0  # successful disk reads
    load_failures: int = 0  # failed disk reads and failed slot writes
    evictions: int = 0  # adapters evicted from a slot to make room (for a slot or for rows)
    compactions: int = 0  # the pool's free rows were gathered into one range to fit an adapter
    cpu_evictions: int = 0  # host copies dropped from the full CPU tier
    load_seconds: float = 0.0  # time in successful source.read and backend.write_slot calls


@dataclass(frozen=True)
class PoolUsage:
    """What the adapter pool holds now, for metrics and benchmarks.

    rows_used counts every allocated range, stale copies still in use included; resident counts the adapters a new
    acquire would hit (as ``resident()``).
    """

    rows_used: int
    rows_total: int
    bytes_per_row: int
    resident: int
    slots_used: int
    slots_total: int
    largest_free_rows: int

    @property
    def bytes_used(self) -> int:
        return self.rows_used * self.bytes_per_row

    @property
    def bytes_total(self) -> int:
        return self.rows_total * self.bytes_per_row


@dataclass
class _Occupant:
    name: str
    pins: int = 0
    stale: bool = False  # invalidated while pinned: cleared on its last release, never handed out again


class SlotCache(Generic[W]):
    """LRU cache of adapters in the device pool (slots and rows), with pinning and a CPU tier; every public method
    is thread-safe. The pool's size comes from the backend (``pool_rows``)."""

    def __init__(
        self,
        num_slots: int,
        cpu_capacity: int,
        source: AdapterSource[W],
        backend: SlotBackend[W],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if cpu_capacity < 0:
            raise ValueError(f"cpu_capacity must be >= 0, got {cpu_capacity}")
        self._num_slots = num_slots
        self._cpu_capacity = cpu_capacity
        self._source = source
        self._backend = backend
        self._clock = clock
        self.stats = CacheStats()
        # The lock is held during source.read for now: simple and correct, but it stalls other callers; later the
        # engine moves loads off the critical path (load on a worker, then install under the lock).
        self._lock = threading.RLock()
        self._free = list(adapter_slots(num_slots))  # a heap: the lowest free slot is used first (deterministic)
        self._occupants: OrderedDict[int, _Occupant] = OrderedDict()  # slot -> occupant, least recently used first
        self._live: dict[str, int] = {}  # name -> its current (non-stale) slot
        self._host: OrderedDict[str, W] = OrderedDict()  # name -> host copy, least recently used first
        self._pending: dict[int, W] = {}  # slot -> weights to write (its rows are allocated already)
        self._rows = RowAllocator(backend.pool_rows)  # key: the slot

    @property
    def num_slots(self) -> int:
        return self._num_slots

    def usage(self) -> PoolUsage:
        """Rows (bytes) and slots in use and in all, and the resident adapters."""
        with self._lock:
            return PoolUsage(
                rows_used=self._rows.used_rows,
                rows_total=self._rows.total,
                bytes_per_row=self._backend.bytes_per_row,
                resident=len(self._live),
                slots_used=len(self._occupants),
                slots_total=self._num_slots,
                largest_free_rows=self._rows.largest_gap(),
            )

    def offset(self, slot: int) -> int:
        """The first pool row of ``slot``'s range; KeyError when the slot holds none."""
        with self._lock:
            return self._rows.range_of(slot).offset

    def acquire(self, name: str) -> int:
        """``reserve`` then ``make_resident`` at once: ``name`` is in its slot on return.

        Raises like ``reserve``, and re-raises a failed slot write (that slot is then cleared and left free).
        """
        with self._lock:
            slot = self.reserve(name)
            error = self.make_resident().get(slot)
            if error is not None:
                self._unpin(name, slot)
                raise error
            return slot

    def reserve(self, name: str) -> int:
        """Pin ``name`` once in a slot and return the slot; a miss plans the device write for ``make_resident``.

        A miss evicts least recently used unpinned adapters until a slot and the adapter's rows are free, and
        compacts the pool when the free rows are not one range. Raises ``NoFreeSlotError`` (having read nothing)
        when every slot is pinned, or (having evicted nothing) when pinned adapters hold so many rows that this one
        cannot fit; re-raises a failed read (having changed nothing).
        """
        with self._lock:
            slot = self._live.get(name)
            if slot is not None:
                self._occupants[slot].pins += 1
                self._occupants.move_to_end(slot)
                self.stats.hits += 1
                return slot
            if not self._free and self._victim() is None:
                raise NoFreeSlotError(f"all {self._num_slots} adapter slots are pinned by running requests")
            self.stats.misses += 1
            weights = self._host_copy(name)  # may raise: nothing has been evicted yet
            rows = self._backend.rows_of(weights)
            victims = self._victims_for(rows)
            if victims is None:
                raise NoFreeSlotError(
                    f"adapter {name!r} needs {rows} pool rows; running requests pin adapters holding "
                    f"{self._rows.used_rows} of {self._rows.total}"
                )
            for victim in victims:
                self._vacate(victim)
                heapq.heappush(self._free, victim)
                self.stats.evictions += 1
            slot = heapq.heappop(self._free)
            offset = self._rows.allocate(slot, rows)
            if offset is None:  # enough rows, but not in one range
                self._compact()
                offset = self._rows.allocate(slot, rows)
                assert offset is not None, "compaction left no range for rows that were free"
            self._pending[slot] = weights
            self._occupants[slot] = _Occupant(name, pins=1)
            self._live[name] = slot
            return slot

    def make_resident(self) -> dict[int, Exception]:
        """Do the device writes ``reserve`` planned; returns slot -> error for each write that failed.

        A failed slot is cleared and its adapter is no longer resident there; the requests that reserved it release
        it as usual, and the last release frees it.
        """
        with self._lock:
            pending, self._pending = self._pending, {}
            failed: dict[int, Exception] = {}
            for slot, weights in pending.items():
                start = self._clock()
                try:
                    self._backend.write_slot(slot, weights, self._rows.range_of(slot).offset)
                except Exception as exc:  # noqa: BLE001 - reported to the caller, which fails the slot's requests
                    self.stats.load_failures += 1
                    failed[slot] = exc
                    self._drop_failed(slot)
                    continue
                self.stats.load_seconds += self._clock() - start
            return failed

    def release(self, name: str, slot: int | None = None) -> None:
        """Unpin one earlier ``acquire`` of ``name``; ``slot`` is the slot that acquire returned.

        ``slot`` may be omitted unless ``name`` is pinned in two slots (it was invalidated while in use and acquired
        again): then only the caller knows which copy its request used. Raises ``ValueError`` when ``name`` is not
        pinned (in ``slot``), or when the slot is ambiguous.
        """
        with self._lock:
            pinned = [s for s, occ in self._occupants.items() if occ.name == name and occ.pins > 0]
            if slot is None:
                if len(pinned) > 1:
                    raise ValueError(f"adapter {name!r} is pinned in slots {pinned}; pass the slot to release")
                slot = pinned[0] if pinned else None
            if slot is None or slot not in pinned:
                raise ValueError(f"adapter {name!r} is not pinned" + ("" if slot is None else f" in slot {slot}"))
            self._unpin(name, slot)

    def tier(self, name: str) -> Literal["gpu", "cpu", "disk"]:
        """The fastest tier a new ``acquire(name)`` finds it in ("gpu" names the slot tier on any device)."""
        with self._lock:
            if name in self._live:
                return "gpu"
            return "cpu" if name in self._host else "disk"

    def resident(self) -> dict[str, int]:
        """name -> slot of every adapter a new acquire would hit (stale slots still in use are left out)."""
        with self._lock:
            return dict(self._live)

    def tier_counts(self) -> tuple[int, int]:
        """(adapters in a slot, host copies held in the CPU tier), for metrics."""
        with self._lock:
            return len(self._live), len(self._host)

    def host_names(self) -> list[str]:
        """The adapters held in the CPU tier, least recently used first."""
        with self._lock:
            return list(self._host)

    def add_host_copy(self, name: str, weights: W, seconds: float = 0.0) -> bool:
        """Keep ``weights``, read ahead of any request (``seconds`` the read took), as the CPU tier's copy of ``name``
        unless a slot or the tier has it already; the least recently used copy makes room. False when not kept
        (held already, or no CPU tier)."""
        with self._lock:
            if name in self._live or name in self._host or self._cpu_capacity == 0:
                return False
            if len(self._host) >= self._cpu_capacity:
                self._host.popitem(last=False)
                self.stats.cpu_evictions += 1
            self._host[name] = weights
            self.stats.loads += 1
            self.stats.load_seconds += seconds
            return True

    def drop_host_copy(self, name: str) -> None:
        """Forget the CPU tier's copy of ``name`` (a slot holding it is left alone); unknown names are a no-op."""
        with self._lock:
            self._host.pop(name, None)

    def invalidate(self, name: str) -> None:
        """``name`` was deleted or replaced on disk: forget every cached copy of it.

        The host copy goes now; an unpinned slot is cleared now; a pinned slot is kept for the requests running on
        it and cleared on its last release, and no new acquire is handed that slot. Unknown names are a no-op.
        """
        with self._lock:
            self._host.pop(name, None)
            slot = self._live.pop(name, None)
            if slot is None:
                return
            occ = self._occupants[slot]
            if occ.pins == 0:
                self._vacate(slot)
                heapq.heappush(self._free, slot)
            else:
                occ.stale = True

    def _drop_failed(self, slot: int) -> None:
        """A write into ``slot`` failed: clear it now (a half-written slot must not be mistaken for an adapter or
        leak into the next occupant) and hand it to no new reservation; its last release frees it."""
        self._backend.clear_slot(slot)
        occ = self._occupants[slot]
        if self._live.get(occ.name) == slot:
            del self._live[occ.name]
        occ.stale = True
        if occ.pins == 0:  # its reservations were all released before the write
            self._vacate(slot)
            heapq.heappush(self._free, slot)

    def _host_copy(self, name: str) -> W:
        """The host copy of ``name``: from the CPU tier, else read from disk and kept in the CPU tier."""
        if name in self._host:
            self._host.move_to_end(name)
            self.stats.cpu_hits += 1
            return self._host[name]
        start = self._clock()
        try:
            weights = self._source.read(name)
        except Exception:
            self.stats.load_failures += 1
            raise
        self.stats.load_seconds += self._clock() - start
        self.stats.loads += 1
        if self._cpu_capacity > 0:
            if len(self._host) >= self._cpu_capacity:
                self._host.popitem(last=False)
                self.stats.cpu_evictions += 1
            self._host[name] = weights
        return weights

    def _victim(self) -> int | None:
        """The least recently used unpinned slot (stale slots are always pinned, so never chosen)."""
        return next((slot for slot, occ in self._occupants.items() if occ.pins == 0), None)

    def _victims_for(self, rows: int) -> list[int] | None:
        """The least recently used unpinned slots to evict so that a slot and ``rows`` pool rows are free (fewest
        in LRU order: none when both are free already); None when evicting every unpinned one would not do."""
        free_slots, free_rows = len(self._free), self._rows.free_rows
        victims: list[int] = []
        for slot, occ in self._occupants.items():
            if free_slots >= 1 and free_rows >= rows:
                break
            if occ.pins == 0:
                victims.append(slot)
                free_slots += 1
                free_rows += self._rows.range_of(slot).rows
        return victims if free_slots >= 1 and free_rows >= rows else None

    def _compact(self) -> None:
        """Slide every range down to one free range at the end; slots whose write is still planned have no rows on
        the device yet (the write goes to their new offset)."""
        for slot, offset in self._rows.compact():
            if slot not in self._pending:
                self._backend.move_slot(slot, offset)
        self.stats.compactions += 1

    def _vacate(self, slot: int) -> None:
        """Clear ``slot`` on the device, give its rows back and forget its occupant and any write planned for it;
        the caller reuses the slot or frees it."""
        occ = self._occupants[slot]
        assert occ.pins == 0, f"vacating pinned slot {slot} ({occ.name!r})"
        self._pending.pop(slot, None)
        self._backend.clear_slot(slot)
        self._rows.free(slot)
        del self._occupants[slot]
        if self._live.get(occ.name) == slot:
            del self._live[occ.name]

    def _unpin(self, name: str, slot: int) -> None:
        occ = self._occupants[slot]
        assert occ.name == name and occ.pins > 0, f"unpinning {name!r} in slot {slot}, which holds {occ}"
        occ.pins -= 1
        if occ.pins == 0 and occ.stale:
            self._vacate(slot)
            heapq.heappush(self._free, slot)
