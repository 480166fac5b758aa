"""The prefix cache of full KV blocks (torch-free): which block holds the K/V of which exact token prefix.

A full block whose K/V is computed is entered under the key ``(parent entry, cache key, its token ids)``. The parent
entry is the id of the entry of the block before it in the sequence (None for a sequence's first block). Entry ids
are never reused, so a key names the block's tokens and every token before it exactly: no hash can collide, and once
an entry is evicted, the entries after it can never be matched again (they age out of the LRU like any other).

Cached blocks that no request holds are *idle*: still matchable, kept in least-recently-released order, and handed
out again (evicted, their entry dropped) only when the block manager has no plain free block left.
"""

from collections import OrderedDict
from collections.abc import Hashable

Key = tuple[int | None, Hashable, tuple[int, ...]]


class PrefixCache:
    def __init__(self) -> None:
        self._block_of: dict[Key, int] = {}
        self._entry_of: dict[int, tuple[Key, int]] = {}  # cached block -> (its key, its entry id)
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no one holds, least recently released first
        self._next_entry = 0

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def num_entries(self) -> int:
        return len(self._entry_of)

    def find(self, parent: int | None, cache_key: Hashable, tokens: tuple[int, ...]) -> int | None:
        """The cached block holding ``tokens`` after the prefix of entry ``parent`` (None: at position 0)."""
        return self._block_of.get((parent, cache_key, tokens))

    def entry(self, block: int) -> int | None:
        """The entry id of a cached block (the parent of the next block's key); None when ``block`` is not cached."""
        found = self._entry_of.get(block)
        return None if found is None else found[1]

    def enter(self, block: int, parent: int | None, cache_key: Hashable, tokens: tuple[int, ...]) -> int:
        """Cache ``block`` (held by a request, its K/V computed) under its key; returns the key's entry id. When
        another block already holds the same key, that one stays the cached copy and ``block`` stays private."""
        key = (parent, cache_key, tokens)
        holder = self._block_of.get(key)
        if holder is not None:
            return self._entry_of[holder][1]
        assert block not in self._entry_of, "a cached block is entered once"
        entry = self._next_entry
        self._next_entry += 1
        self._block_of[key] = block
        self._entry_of[block] = (key, entry)
        return entry

    def hold(self, block: int) -> None:
        """A request takes ``block`` (a prefix hit): it is no longer idle."""
        self._idle.pop(block, None)

    def release(self, block: int) -> bool:
        """The last holder of ``block`` let it go: a cached block becomes idle (the most recently released);
        False when it is not cached (the caller frees it)."""
        if block not in self._entry_of:
            return False
        self._idle[block] = None
        return True

    def evict(self) -> int | None:
        """Drop the least recently released idle block from the cache and return it; None when none is idle."""
        if not self._idle:
            return None
        block, _ = self._idle.popitem(last=False)
        key, _ = self._entry_of.pop(block)
        del self._block_of[key]
        return block
