"""``RowAllocator``: contiguous ranges of rank rows in the adapter pool, first-fit, compacted when fragmented.

Every wrapped layer stores the resident adapters' LoRA rows in one pool of ``total`` rows (``BatchedLoraLinear``);
an adapter of rank ``r`` occupies rows ``offset .. offset + r - 1`` at the same offset in every layer, so one
allocation here places it everywhere. Torch-free: the slot cache decides, the backend moves the rows.

First fit keeps allocations packed towards the start; when the free rows add up to a request but no single gap
holds it, ``compact`` slides every range down (in offset order, so each move only overwrites rows already vacated)
and the free rows become one gap at the end.
"""

from bisect import insort
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class RowRange:
    """Rows ``offset .. offset + rows - 1`` held by ``key`` (an adapter slot)."""

    offset: int
    rows: int
    key: int

    @property
    def end(self) -> int:
        return self.offset + self.rows


class RowAllocator:
    """First-fit allocator of contiguous row ranges in a pool of ``total`` rows, one range per key."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"the row pool needs at least one row, got {total}")
        self.total = total
        self._ranges: list[RowRange] = []  # sorted by offset
        self._by_key: dict[int, RowRange] = {}

    @property
    def used_rows(self) -> int:
        return sum(r.rows for r in self._ranges)

    @property
    def free_rows(self) -> int:
        return self.total - self.used_rows

    def __contains__(self, key: int) -> bool:
        return key in self._by_key

    def range_of(self, key: int) -> RowRange:
        """The range ``key`` holds; KeyError when it holds none."""
        return self._by_key[key]

    def ranges(self) -> list[RowRange]:
        """Every allocated range, by offset."""
        return list(self._ranges)

    def gaps(self) -> list[tuple[int, int]]:
        """Free (offset, rows) gaps, by offset."""
        out, cursor = [], 0
        for r in self._ranges:
            if r.offset > cursor:
                out.append((cursor, r.offset - cursor))
            cursor = r.end
        if cursor < self.total:
            out.append((cursor, self.total - cursor))
        return out

    def largest_gap(self) -> int:
        return max((rows for _, rows in self.gaps()), default=0)

    def allocate(self, key: int, rows: int) -> int | None:
        """The offset of a new range of ``rows`` rows for ``key`` in the first gap that holds it; None when no gap
        does (``compact`` may make one: see ``free_rows``)."""
        if key in self._by_key:
            raise ValueError(f"key {key} already holds rows {self._by_key[key]}")
        if not 1 <= rows <= self.total:
            raise ValueError(f"cannot allocate {rows} rows in a pool of {self.total}")
        offset = next((start for start, size in self.gaps() if size >= rows), None)
        if offset is not None:
            taken = RowRange(offset, rows, key)
            insort(self._ranges, taken)
            self._by_key[key] = taken
        return offset

    def free(self, key: int) -> None:
        """Give ``key``'s rows back; KeyError when it holds none."""
        taken = self._by_key.pop(key)
        self._ranges.remove(taken)

    def compact(self) -> list[tuple[int, int]]:
        """Slide every range down to close the gaps; returns (key, new offset) of each range that moved, in the
        order the rows must be moved (ascending: a move never overwrites rows of a range not yet moved)."""
        moves: list[tuple[int, int]] = []
        cursor = 0
        packed: list[RowRange] = []
        for r in self._ranges:
            if r.offset != cursor:
                moves.append((r.key, cursor))
                r = RowRange(cursor, r.rows, r.key)
                self._by_key[r.key] = r
            packed.append(r)
            cursor = r.end
        self._ranges = packed
        return moves
