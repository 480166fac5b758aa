"""SlotCache bookkeeping against a fake disk and a fake device: LRU, pinning, CPU tier, invalidation, all-or-nothing,
and the adapter pool's rows: a byte budget, eviction by rows, compaction that keeps every adapter's rows intact."""

import random
from collections import Counter

import pytest

from server.adapters.errors import AdapterFormatError
from server.kernels.slots import adapter_slots
from server.lora.pool_fit import resident_under_budget
from server.lora.slot_cache import NoFreeSlotError, SlotCache
from tests.helpers.slot_cache_probe import pin_count

Weights = tuple[str, int]  # (adapter name, version on disk): lets the fake device tell a stale copy from a fresh one


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """Disk: every name is readable unless told to fail; a read takes 2 s on the fake clock."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.version: Counter[str] = Counter()
        self.reads: list[str] = []
        self.failing: set[str] = set()
        self.clock = clock

    def read(self, name: str) -> Weights:
        if self.clock:
            self.clock.now += 2.0
        if name in self.failing:
            raise AdapterFormatError(f"{name}: adapter_model.safetensors is missing")
        self.reads.append(name)
        return (name, self.version[name])


class FakeBackend:
    """Device: ``slots`` mirrors what each slot holds; writing over an uncleared slot is a bug in the cache.

    The pool is simulated row by row: ``rows[i]`` is (name, version, j) for row j of the adapter written there, so
    a write over another adapter's rows, or a move that loses rows, shows up in ``check_rows``.
    """

    def __init__(
        self, clock: FakeClock | None = None, pool_rows: int = 16, ranks: dict[str, int] | None = None
    ) -> None:
        self.slots: dict[int, Weights] = {}
        self.events: list[tuple[str, int]] = []
        self.failing_writes: set[str] = set()
        self.clock = clock
        self.pool_rows = pool_rows
        self.bytes_per_row = 1000
        self.ranks = ranks if ranks is not None else {}
        self.rows: list[tuple[str, int, int] | None] = [None] * pool_rows
        self.where: dict[int, tuple[int, int]] = {}  # slot -> (offset, rank) of what it holds

    def rows_of(self, weights: Weights) -> int:
        return self.ranks.get(weights[0], 8)

    def write_slot(self, slot: int, weights: Weights, offset: int) -> None:
        if self.clock:
            self.clock.now += 0.5
        assert slot not in self.slots, f"write over uncleared slot {slot} holding {self.slots[slot]}"
        rank = self.rows_of(weights)
        for other, (o, r) in self.where.items():
            assert offset + rank <= o or o + r <= offset, f"slot {slot} written over slot {other}'s rows"
        self.events.append(("write", slot))
        self.slots[slot] = weights
        self.where[slot] = (offset, rank)
        for j in range(rank):
            self.rows[offset + j] = (*weights, j)
        if weights[0] in self.failing_writes:
            raise RuntimeError("device out of memory")

    def clear_slot(self, slot: int) -> None:
        self.events.append(("clear", slot))
        self.slots.pop(slot, None)
        self.where.pop(slot, None)

    def move_slot(self, slot: int, offset: int) -> None:
        self.events.append(("move", slot))
        old, rank = self.where[slot]
        assert offset < old, "compaction moves rows down"
        for j in range(rank):  # first rows first, as BatchedLoraLinear.move_slot copies
            self.rows[offset + j] = self.rows[old + j]
        self.where[slot] = (offset, rank)

    def check_rows(self) -> None:
        """Every slot's rows hold its adapter, row by row, and no two slots share a row."""
        taken: set[int] = set()
        for slot, (offset, rank) in self.where.items():
            name, version = self.slots[slot]
            assert self.rows[offset : offset + rank] == [(name, version, j) for j in range(rank)], slot
            assert not taken & set(range(offset, offset + rank))
            taken |= set(range(offset, offset + rank))

    def names(self) -> dict[str, int]:
        return {name: slot for slot, (name, _) in self.slots.items()}


def make(num_slots: int = 2, cpu_capacity: int = 0, clock: FakeClock | None = None, pool_rows: int | None = None,
         ranks: dict[str, int] | None = None):  # fmt: skip
    """A cache over fakes; adapters are rank 8 unless ``ranks`` says otherwise, and the pool holds ``num_slots``
    of them unless ``pool_rows`` says otherwise (so slots, not rows, are the limit, as before the pool)."""
    source = FakeSource(clock)
    backend = FakeBackend(clock, pool_rows if pool_rows is not None else 8 * num_slots, ranks)
    cache = SlotCache(num_slots, cpu_capacity, source, backend, **({"clock": clock} if clock else {}))
    return cache, source, backend


def test_hits_misses_and_lru_eviction_order() -> None:
    cache, source, backend = make(num_slots=2)
    assert cache.num_slots == 2
    a, b = cache.acquire("a"), cache.acquire("b")
    assert {a, b} == set(adapter_slots(2))
    assert cache.acquire("a") == a  # hit: "a" is now most recently used
    for name in ("a", "a", "b"):
        cache.release(name)
    assert cache.acquire("c") == b  # "b" was least recently used
    assert cache.resident() == {"a": a, "c": b} == backend.names()
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions, cache.stats.loads) == (1, 3, 1, 3)
    assert source.reads == ["a", "b", "c"]


def test_pinned_adapters_are_never_evicted() -> None:
    cache, _, _ = make(num_slots=2)
    a = cache.acquire("a")  # pinned, and least recently used
    cache.acquire("b")
    cache.release("b")
    cache.acquire("c")
    assert cache.resident().get("a") == a and cache.resident().get("b") is None


def test_no_free_slot_raises_without_reading() -> None:
    cache, source, backend = make(num_slots=2)
    cache.acquire("a"), cache.acquire("b")
    with pytest.raises(NoFreeSlotError):
        cache.acquire("c")
    assert source.reads == ["a", "b"] and cache.resident() == backend.names()
    assert cache.stats.misses == 2 and cache.tier("c") == "disk"


def test_failing_read_evicts_nothing() -> None:
    cache, source, backend = make(num_slots=1)
    cache.acquire("a")
    cache.release("a")
    events = list(backend.events)
    source.failing.add("bad")
    with pytest.raises(AdapterFormatError):
        cache.acquire("bad")
    assert backend.events == events and cache.resident() == {"a": 1} == backend.names()
    assert cache.stats.load_failures == 1 and cache.stats.evictions == 0 and pin_count(cache, "bad") == 0


def test_failing_write_clears_and_frees_the_slot() -> None:
    cache, _, backend = make(num_slots=1)
    backend.failing_writes.add("bad")
    with pytest.raises(RuntimeError):
        cache.acquire("bad")
    assert backend.slots == {} and cache.resident() == {} and cache.stats.load_failures == 1
    assert cache.acquire("a") == 1


def test_eviction_clears_before_the_new_write() -> None:
    cache, _, backend = make(num_slots=1)
    cache.acquire("a")
    cache.release("a")
    cache.acquire("b")
    assert backend.events == [("write", 1), ("clear", 1), ("write", 1)]


def test_cpu_tier_serves_reacquire_without_disk_read() -> None:
    cache, source, _ = make(num_slots=1, cpu_capacity=2)
    for name in ("a", "b", "a"):
        cache.acquire(name)
        cache.release(name)
    assert source.reads == ["a", "b"] and cache.stats.cpu_hits == 1
    assert cache.tier("a") == "gpu" and cache.tier("b") == "cpu" and cache.tier("z") == "disk"


def test_cpu_tier_is_bounded_lru() -> None:
    cache, source, _ = make(num_slots=1, cpu_capacity=2)
    for name in ("a", "b", "a", "c"):  # the re-acquire of "a" makes "b" the least recently used host copy
        cache.acquire(name)
        cache.release(name)
    assert cache.tier("b") == "disk" and cache.tier("a") == "cpu" and cache.stats.cpu_evictions == 1
    cache.acquire("b")
    assert source.reads == ["a", "b", "c", "b"]


def test_cpu_capacity_zero_always_reads_disk() -> None:
    cache, source, _ = make(num_slots=1, cpu_capacity=0)
    for name in ("a", "b", "a"):
        cache.acquire(name)
        cache.release(name)
    assert source.reads == ["a", "b", "a"] and cache.stats.cpu_hits == 0 and cache.tier("b") == "disk"


def test_release_errors() -> None:
    cache, _, _ = make(num_slots=2)
    with pytest.raises(ValueError, match="not pinned"):
        cache.release("never")
    slot = cache.acquire("a")
    with pytest.raises(ValueError, match="not pinned in slot"):
        cache.release("a", slot + 1)
    cache.release("a", slot)
    with pytest.raises(ValueError, match="not pinned"):
        cache.release("a")


def test_invalidate_unpinned_clears_now() -> None:
    cache, source, backend = make(num_slots=1, cpu_capacity=1)
    cache.acquire("a")
    cache.release("a")
    source.version["a"] += 1
    cache.invalidate("a")
    assert backend.slots == {} and cache.tier("a") == "disk"
    cache.acquire("a")
    assert backend.slots == {1: ("a", 1)} and source.reads == ["a", "a"]
    cache.invalidate("unknown")  # no-op


def test_invalidate_pinned_drains_the_stale_slot() -> None:
    cache, source, backend = make(num_slots=2)
    old = cache.acquire("a")
    source.version["a"] += 1
    cache.invalidate("a")
    assert backend.slots[old] == ("a", 0) and cache.resident().get("a") is None and cache.tier("a") == "disk"
    new = cache.acquire("a")  # must not be handed the stale copy
    assert new != old and backend.slots[new] == ("a", 1) and pin_count(cache, "a") == 2
    with pytest.raises(ValueError, match="pass the slot"):
        cache.release("a")
    cache.release("a", old)  # the last request on the stale copy finished: its slot is cleared
    assert backend.slots == {new: ("a", 1)} and cache.resident() == {"a": new}
    cache.release("a")


def test_invalidate_pinned_with_one_slot_raises_no_free_slot() -> None:
    cache, source, _ = make(num_slots=1)
    cache.acquire("a")
    cache.invalidate("a")
    with pytest.raises(NoFreeSlotError):
        cache.acquire("a")
    cache.release("a")
    assert cache.acquire("a") == 1 and source.reads == ["a", "a"]


def test_load_seconds_with_fake_clock() -> None:
    clock = FakeClock()
    cache, _, _ = make(num_slots=1, cpu_capacity=2, clock=clock)
    for name in ("a", "b", "b", "a"):  # disk (read + write), disk, slot hit (free), CPU tier (write only)
        cache.acquire(name)
        cache.release(name)
    assert cache.stats.load_seconds == pytest.approx(2 * (2.0 + 0.5) + 0.5)
    assert (cache.stats.loads, cache.stats.cpu_hits, cache.stats.hits) == (2, 1, 1)


@pytest.mark.parametrize("bad", [(0, 0), (2, -1)])
def test_constructor_rejects_bad_sizes(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        SlotCache(bad[0], bad[1], FakeSource(), FakeBackend())
    with pytest.raises(ValueError, match="at least one row"):
        SlotCache(1, 0, FakeSource(), FakeBackend(pool_rows=0))


def test_random_operations_keep_invariants() -> None:
    rng = random.Random(0)
    num_slots = 3
    cache, source, backend = make(num_slots=num_slots, cpu_capacity=2)
    names = [f"n{i}" for i in range(6)] + ["bad"]
    source.failing.add("bad")
    held: list[tuple[str, int]] = []  # one entry per unreleased acquire: (name, slot it returned)
    for _ in range(2000):
        live = {n: s for s, (n, v) in backend.slots.items() if v == source.version[n]}
        pinned = {s for _, s in held}
        reads = len(source.reads)
        op = rng.random()
        if op < 0.4:
            name = rng.choice(names)
            can = name in live or len(backend.slots) < num_slots or bool(set(backend.slots) - pinned)
            try:
                slot = cache.acquire(name)
            except NoFreeSlotError:
                assert not can and len(source.reads) == reads
            except AdapterFormatError:
                assert name == "bad" and can
            else:
                assert can and name != "bad" and live.get(name, slot) == slot
                held.append((name, slot))
        elif op < 0.95 and held:
            name, slot = held.pop(rng.randrange(len(held)))
            cache.release(name, slot)
        elif op >= 0.95:
            name = rng.choice(names)
            source.version[name] += 1
            cache.invalidate(name)
        live = {n: s for s, (n, v) in backend.slots.items() if v == source.version[n]}
        assert cache.resident() == live and len(backend.slots) <= num_slots
        assert set(backend.slots) <= set(adapter_slots(num_slots))
        assert all(backend.slots[s][0] == n for n, s in held)  # pinned adapters stay resident in their slot
        stale = set(backend.slots) - set(live.values())
        assert stale <= {s for _, s in held}  # a stale copy stays only while a request still uses it
        counts = Counter(n for n, _ in held)
        assert all(pin_count(cache, n) == counts[n] for n in names)
    assert cache.stats.hits > 100 and cache.stats.evictions > 100 and cache.stats.load_failures > 10


# ---- the adapter pool: rows (bytes) as well as slots ------------------------------------------------------------
def _load(cache: SlotCache, *names: str) -> None:
    for name in names:
        cache.acquire(name)
        cache.release(name)


def test_a_byte_budget_holds_adapters_by_their_rank() -> None:
    """256 rows: 8 rank-8 and 2 rank-64 adapters (192 rows) fit with room to spare, one more rank-64 fills it; the
    next rank-64 evicts least recently used adapters until 64 rows are free (here: the eight rank-8 ones)."""
    ranks = {f"s{i}": 8 for i in range(8)} | {f"b{i}": 64 for i in range(4)}
    cache, _, backend = make(num_slots=16, pool_rows=256, ranks=ranks)
    _load(cache, *(f"s{i}" for i in range(8)), "b0", "b1")
    usage = cache.usage()
    assert (usage.resident, usage.rows_used, usage.rows_total, usage.largest_free_rows) == (10, 192, 256, 64)
    assert (usage.bytes_used, usage.bytes_total, usage.slots_used, usage.slots_total) == (192_000, 256_000, 10, 16)
    _load(cache, "b2")
    assert cache.usage().rows_used == 256 and cache.stats.evictions == 0
    _load(cache, "b3")
    assert set(cache.resident()) == {"b0", "b1", "b2", "b3"} and cache.stats.evictions == 8
    backend.check_rows()
    # The same through pool_fit (the benchmark's helper); before the pool, 256 rows at max rank 64 held 4 adapters.
    assert resident_under_budget([8] * 8 + [64] * 3, 256 * 1000, 1000, num_slots=16).resident == 11


def test_the_slot_count_still_bounds_residency() -> None:
    cache, _, _ = make(num_slots=2, pool_rows=100, ranks={"a": 4, "b": 4, "c": 4})
    _load(cache, "a", "b", "c")
    assert set(cache.resident()) == {"b", "c"} and cache.usage().rows_used == 8


def test_pinned_adapters_keep_their_rows_and_a_misfit_evicts_nothing() -> None:
    ranks = {"big1": 64, "big2": 64, "big3": 64, "s1": 16, "s2": 16}
    cache, source, backend = make(num_slots=8, pool_rows=128, ranks=ranks)
    cache.acquire("big1")  # pinned
    _load(cache, "s1", "s2")
    cache.acquire("big2")  # evicts both small unpinned adapters for its 64 rows, never the pinned one
    assert set(cache.resident()) == {"big1", "big2"} and cache.stats.evictions == 2
    events = list(backend.events)
    with pytest.raises(NoFreeSlotError, match="needs 64 pool rows"):
        cache.acquire("big3")
    assert backend.events == events and set(cache.resident()) == {"big1", "big2"} and pin_count(cache, "big3") == 0
    assert source.reads[-1] == "big3"  # the read tells the rank; the host copy stays in the CPU tier if it has room
    cache.release("big2")
    assert cache.acquire("big3") == cache.resident()["big3"] and pin_count(cache, "big1") == 1
    backend.check_rows()


def test_fragmented_free_rows_are_compacted_and_pinned_adapters_move_intact() -> None:
    """a b c d of 16 rows fill 64; a and c go: 32 rows free but in two gaps. A rank-32 adapter compacts the pool:
    the pinned b and d slide down (their rows copied on the device), the new one takes the end."""
    ranks = {"a": 16, "b": 16, "c": 16, "d": 16, "e": 32}
    cache, _, backend = make(num_slots=8, pool_rows=64, ranks=ranks)
    for name in "abcd":
        cache.acquire(name)
    cache.release("a"), cache.release("c")
    b, d = cache.resident()["b"], cache.resident()["d"]
    assert (cache.offset(b), cache.offset(d)) == (16, 48)
    e = cache.acquire("e")
    assert cache.stats.compactions == 1 and backend.events[-3:] == [("move", b), ("move", d), ("write", e)]
    assert (cache.offset(b), cache.offset(d), cache.offset(e)) == (0, 16, 32)
    assert pin_count(cache, "b") == pin_count(cache, "d") == 1 and set(cache.resident()) == {"b", "d", "e"}
    backend.check_rows()


def test_compaction_before_the_writes_places_planned_writes_at_their_new_rows() -> None:
    """Reservations not yet written have no rows on the device: compaction moves nothing for them, and
    make_resident writes them where they now are."""
    ranks = {"a": 16, "b": 16, "c": 16, "d": 32}
    cache, _, backend = make(num_slots=8, pool_rows=64, ranks=ranks)
    a, b, c = cache.reserve("a"), cache.reserve("b"), cache.reserve("c")  # rows 0, 16, 32; nothing written yet
    cache.release("a", a)
    d = cache.reserve("d")  # evicts a (planned only), 32 free rows in two gaps: compaction, no device move
    assert cache.stats.compactions == 1 and all(kind != "move" for kind, _ in backend.events)
    assert cache.make_resident() == {}
    assert {s: backend.where[s][0] for s in (b, c, d)} == {b: 0, c: 16, d: 32}
    backend.check_rows()


def test_random_operations_with_mixed_ranks_keep_rows_intact() -> None:
    rng = random.Random(1)
    names = [f"n{i}" for i in range(10)]
    ranks = {name: rng.choice([4, 8, 16, 32, 64]) for name in names}
    cache, _, backend = make(num_slots=6, cpu_capacity=3, pool_rows=128, ranks=ranks)
    held: list[tuple[str, int]] = []
    refused = 0
    for _ in range(1500):
        if rng.random() < 0.5 or not held:
            name = rng.choice(names)
            pinned_rows = sum(ranks[n] for n in {n for n, _ in held} if n != name)
            pinned_slots = len({n for n, _ in held})
            try:
                held.append((name, cache.acquire(name)))
            except NoFreeSlotError:
                refused += 1
                assert pinned_rows + ranks[name] > 128 or pinned_slots >= 6  # only pins can make it not fit
        else:
            name, slot = held.pop(rng.randrange(len(held)))
            cache.release(name, slot)
        backend.check_rows()
        assert all(backend.slots[s][0] == n for n, s in held)  # pinned adapters stay resident in their slot
        usage = cache.usage()
        assert usage.rows_used == sum(ranks[n] for n in cache.resident()) <= 128
    assert cache.stats.compactions > 10 and cache.stats.evictions > 100 and refused > 10
