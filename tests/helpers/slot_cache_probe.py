"""Test-only look inside a ``SlotCache``: production code never needs to count pins."""

from server.lora.slot_cache import SlotCache


def pin_count(cache: SlotCache, name: str) -> int:
    """Unreleased acquires of ``name``, summed over its current slot and a stale one still in use."""
    with cache._lock:
        return sum(occ.pins for occ in cache._occupants.values() if occ.name == name)
