"""How many adapters of given ranks an adapter pool keeps resident: the real ``SlotCache`` over stand-in adapters.

For benchmarks and capacity planning (no model, no torch): each stand-in adapter is just its rank, loaded in the
given order with nothing pinned, so the LRU policy and the row allocator decide exactly as they do in the server.
"""

from collections.abc import Sequence

from server.lora.slot_cache import PoolUsage, SlotCache

DORA_EXTRA_ROWS = 1  # a DoRA adapter's row of g - 1, past its largest rank (server.lora.dora)


def adapter_rows(rank: int, use_dora: bool) -> int:
    """Pool rows an adapter of largest rank ``rank`` takes in every layer (``LoraModel.rows_of``)."""
    return rank + (DORA_EXTRA_ROWS if use_dora else 0)


class _RankOnly:
    """Source and backend at once: adapter ``"<i>"`` is rank ``ranks[i]``; the device side does nothing."""

    def __init__(self, ranks: Sequence[int], pool_rows: int, bytes_per_row: int) -> None:
        self.ranks = ranks
        self.pool_rows = pool_rows
        self.bytes_per_row = bytes_per_row

    def read(self, name: str) -> int:
        return self.ranks[int(name)]

    def rows_of(self, weights: int) -> int:
        return weights

    def write_slot(self, slot: int, weights: int, offset: int) -> None:
        pass

    def clear_slot(self, slot: int) -> None:
        pass

    def move_slot(self, slot: int, offset: int) -> None:
        pass


def resident_under_budget(
    ranks: Sequence[int], budget_bytes: int, bytes_per_row: int, num_slots: int, dora: Sequence[bool] = ()
) -> PoolUsage:
    """Load adapters of ``ranks`` one after another (each used once, then released) into a pool of
    ``budget_bytes // bytes_per_row`` rows and ``num_slots`` slots; the pool's usage after the last one.

    ``bytes_per_row``: ``LoraModel.bytes_per_row`` (one rank row of A and B over every wrapped layer). ``dora[i]``:
    adapter ``i`` is DoRA (one row more; missing entries are plain LoRA). Raises ValueError when the budget holds no
    row, or an adapter does not fit the whole pool.
    """
    ranks = [adapter_rows(r, i < len(dora) and dora[i]) for i, r in enumerate(ranks)]
    pool_rows = budget_bytes // bytes_per_row
    if pool_rows < 1 or max(ranks, default=0) > pool_rows:
        raise ValueError(f"a budget of {budget_bytes} bytes is {pool_rows} rows: too small for rank {max(ranks)}")
    fake = _RankOnly(ranks, pool_rows, bytes_per_row)
    cache: SlotCache[int] = SlotCache(num_slots, 0, fake, fake)
    for i in range(len(ranks)):
        cache.acquire(str(i))
        cache.release(str(i))
    return cache.usage()
