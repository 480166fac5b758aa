"""The adapter pool's row allocator: first fit, fragmentation, and compaction that keeps every range's rows."""

import random

import pytest

from server.lora.row_allocator import RowAllocator, RowRange


def test_first_fit_reuses_the_first_gap_that_holds_the_rows() -> None:
    rows = RowAllocator(64)
    assert [rows.allocate(k, 16) for k in (1, 2, 3)] == [0, 16, 32]
    rows.free(1)
    rows.free(3)
    assert rows.gaps() == [(0, 16), (32, 32)] and rows.free_rows == 48 and rows.largest_gap() == 32
    assert rows.allocate(4, 8) == 0  # the first gap, although the second is larger
    assert rows.allocate(5, 12) == 32  # 8 rows left in the first gap: too few
    assert rows.allocate(6, 8) == 8
    assert rows.ranges() == [RowRange(0, 8, 4), RowRange(8, 8, 6), RowRange(16, 16, 2), RowRange(32, 12, 5)]
    assert rows.used_rows == 44 and 5 in rows and 1 not in rows


def test_fragmented_free_rows_need_compaction() -> None:
    rows = RowAllocator(64)
    for key in range(4):
        rows.allocate(key, 16)
    rows.free(0)
    rows.free(2)
    assert rows.free_rows == 32 and rows.allocate(9, 32) is None and 9 not in rows  # two gaps of 16
    assert rows.compact() == [(1, 0), (3, 16)]  # in move order: ascending, each onto rows already vacated
    assert rows.gaps() == [(32, 32)] and rows.range_of(3) == RowRange(16, 16, 3)
    assert rows.allocate(9, 32) == 32 and rows.free_rows == 0
    assert rows.compact() == []  # nothing to move


def test_refuses_bad_requests() -> None:
    rows = RowAllocator(8)
    rows.allocate(1, 4)
    with pytest.raises(ValueError, match="already holds"):
        rows.allocate(1, 2)
    with pytest.raises(ValueError, match="cannot allocate"):
        rows.allocate(2, 9)
    with pytest.raises(ValueError, match="cannot allocate"):
        rows.allocate(2, 0)
    with pytest.raises(KeyError):
        rows.free(7)
    with pytest.raises(ValueError):
        RowAllocator(0)


def test_random_allocations_never_overlap_and_compaction_moves_data_intact() -> None:
    """A simulated pool (one owner per row) follows every allocation and move: ranges never overlap, and after a
    compaction (moves applied in the order given) every key's rows still hold its data."""
    rng = random.Random(0)
    total = 200
    rows = RowAllocator(total)
    data: list[tuple[int, int] | None] = [None] * total  # (key, j) of row j of key's range
    compactions = 0
    for step in range(3000):
        live = [r.key for r in rows.ranges()]
        if live and rng.random() < 0.45:
            rows.free(rng.choice(live))
            continue
        key, size = step, rng.choice([4, 8, 16, 32, 64])
        offset = rows.allocate(key, size)
        if offset is None and rows.free_rows >= size:
            for moved, new in rows.compact():
                old_offset = next(o for o in range(total) if data[o] == (moved, 0))
                for j in range(rows.range_of(moved).rows):
                    data[new + j] = data[old_offset + j]
            compactions += 1
            offset = rows.allocate(key, size)
            assert offset is not None
        if offset is not None:
            for j in range(size):
                data[offset + j] = (key, j)
        covered = [i for r in rows.ranges() for i in range(r.offset, r.end)]
        assert len(covered) == len(set(covered)) and all(0 <= i < total for i in covered)
        for r in rows.ranges():
            assert data[r.offset : r.end] == [(r.key, j) for j in range(r.rows)]
    assert compactions > 20
