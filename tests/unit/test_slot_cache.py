"""SlotCache bookkeeping against a fake disk and a fake device: LRU, pinning, CPU tier, invalidation, all-or-nothing."""

import random
from collections import Counter

import pytest

from server.adapters.errors import AdapterFormatError
from server.kernels.slots import adapter_slots
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
    """Device: ``slots`` mirrors what each slot holds; writing over an uncleared slot is a bug in the cache."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.slots: dict[int, Weights] = {}
        self.events: list[tuple[str, int]] = []
        self.failing_writes: set[str] = set()
        self.clock = clock

    def write_slot(self, slot: int, weights: Weights) -> None:
        if self.clock:
            self.clock.now += 0.5
        assert slot not in self.slots, f"write over uncleared slot {slot} holding {self.slots[slot]}"
        self.events.append(("write", slot))
        self.slots[slot] = weights
        if weights[0] in self.failing_writes:
            raise RuntimeError("device out of memory")

    def clear_slot(self, slot: int) -> None:
        self.events.append(("clear", slot))
        self.slots.pop(slot, None)

    def names(self) -> dict[str, int]:
        return {name: slot for slot, (name, _) in self.slots.items()}


def make(num_slots: int = 2, cpu_capacity: int = 0, clock: FakeClock | None = None):
    source, backend = FakeSource(clock), FakeBackend(clock)
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
