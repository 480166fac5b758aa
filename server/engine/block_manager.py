"""Paged KV memory: which fixed-size blocks of the KV pool each running request holds (torch-free).

A request's ``block_table`` lists its blocks in position order: position p lives at offset ``p % block_size`` of
block ``block_table[p // block_size]``. Blocks are taken as a request grows (only for the tokens scheduled in a step)
and given back when it finishes or is preempted. A block may be held by several requests (refcounts):

- prefix caching (``prefix_caching``): full blocks whose K/V is computed enter an exact-keyed prefix cache
  (``PrefixCache``); a request admitted later on the same ``cache_key`` starts from the blocks of its longest cached
  prefix. Cached blocks nobody holds stay matchable until a plain free block runs out; a request's blocks are
  released tail first, so its tail is evicted before its head (a shorter prefix stays useful longer).
- forks (``EngineRequest.fork_parent``, with or without prefix caching): a child shares its parent's full prompt
  blocks; the partially covered last block is copied (the child writes into it), the copy done by the device.

No block is ever written while shared: a request writes only positions at or past its ``num_computed``, and every
shared block lies wholly before them.
"""

from dataclasses import dataclass

from server.engine.prefix_cache import PrefixCache
from server.engine.request import EngineRequest

_NOTHING_ENTERED: tuple[int, int | None] = (0, None)


@dataclass(frozen=True)
class SharedPrefix:
    """What a request starts from at admission: a prefix-cache hit (``lookup``) or its fork parent's prompt."""

    blocks: tuple[int, ...] = ()  # full blocks it shares, in position order
    tokens: int = 0  # positions already computed: its num_computed at admission
    idle: int = 0  # of ``blocks``, cached ones nobody holds now (taking them shrinks num_free)
    copy_from: int | None = None  # a block whose first ``tokens % block_size`` positions are copied into a new one
    lookup: bool = False  # a prefix-cache lookup (counted in query_tokens/hit_tokens), not a fork


class BlockManager:
    """``num_blocks`` KV blocks of ``block_size`` positions each, ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one position")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # plain free blocks; pop() hands out the lowest first
        self._cache = PrefixCache()
        # request -> (its leading full blocks already entered in the cache, the entry id of the last of them)
        self._entered: dict[EngineRequest, tuple[int, int | None]] = {}
        self.query_tokens = 0  # tokens of the requests looked up at admission (monotonic)
        self.hit_tokens = 0  # of those, the ones found in the cache (monotonic)

    # ---- counters ----------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a request can take now: plain free ones and idle cached ones (evicted when taken)."""
        return len(self._free) + self._cache.num_idle

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Idle cached blocks: nobody holds them, a later request on the same prefix may."""
        return self._cache.num_idle

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold ``positions`` positions."""
        return -(-positions // self.block_size)

    # ---- admission ---------------------------------------------------------------------------------------------
    def lookup(self, req: EngineRequest) -> SharedPrefix:
        """The blocks of ``req``'s longest cached prefix of ``prompt_ids + output_ids`` (a preempted request finds
        its own), without taking them. At least one token is left to compute, because its logits are needed; none
        is found for a request that wants ``prompt_logprobs`` (every prompt position must be computed) or that has
        no ``cache_key``."""
        if not self.prefix_caching or req.cache_key is None or req.params.prompt_logprobs is not None:
            return SharedPrefix()
        size = self.block_size
        blocks: list[int] = []
        parent: int | None = None
        for i in range((req.num_tokens - 1) // size):
            block = self._cache.find(parent, req.cache_key, tuple(req.token_slice(i * size, (i + 1) * size)))
            if block is None:
                break
            blocks.append(block)
            parent = self._cache.entry(block)
        idle = sum(1 for b in blocks if self._refs[b] == 0)
        return SharedPrefix(tuple(blocks), len(blocks) * size, idle, lookup=True)

    def fork_prefix(self, parent: EngineRequest, length: int) -> SharedPrefix:
        """The first ``length`` positions of a running ``parent`` (computed), for a child to start from."""
        assert parent.num_computed >= length and parent.block_table, "a fork parent has computed the shared prompt"
        full, partial = divmod(length, self.block_size)
        copy_from = parent.block_table[full] if partial else None
        return SharedPrefix(tuple(parent.block_table[:full]), length, copy_from=copy_from)

    def admission_blocks(self, prefix: SharedPrefix, num_tokens: int) -> int:
        """Blocks that leave ``num_free`` when a request starts from ``prefix`` and runs ``num_tokens`` more."""
        return self.blocks_for(prefix.tokens + num_tokens) - len(prefix.blocks) + prefix.idle

    def admit(self, req: EngineRequest, prefix: SharedPrefix, num_tokens: int) -> list[tuple[int, int]]:
        """Give ``req`` (holding no block) the blocks of ``prefix`` and new ones for ``num_tokens`` positions after it.
        Returns the (source, destination) block copies the device must make before the step runs."""
        assert not req.block_table, "a request is admitted holding no block"
        assert self.admission_blocks(prefix, num_tokens) <= self.num_free, "admission checks the free blocks first"
        for block in prefix.blocks:
            if self._refs[block] == 0:
                self._cache.hold(block)
            self._refs[block] += 1
        req.block_table = list(prefix.blocks)
        copies = []
        if prefix.copy_from is not None:
            copies.append((prefix.copy_from, self._take()))
            req.block_table.append(copies[0][1])
        self._extend(req, prefix.tokens + num_tokens)
        if prefix.lookup:
            self.query_tokens += req.num_tokens
            self.hit_tokens += prefix.tokens
        return copies

    def fork(self, parent: EngineRequest, child: EngineRequest, length: int) -> list[tuple[int, int]]:
        """``child`` shares the parent's full blocks of its first ``length`` positions; a partially covered last block
        is copied. Returns the [(source, destination)] block copies; the child then holds ``blocks_for(length)``."""
        return self.admit(child, self.fork_prefix(parent, length), 0)

    # ---- running -----------------------------------------------------------------------------------------------
    def blocks_needed(self, req: EngineRequest, num_tokens: int) -> int:
        """New blocks ``req`` needs to run ``num_tokens`` more tokens (past its ``num_computed``)."""
        return max(0, self.blocks_for(req.num_computed + num_tokens) - len(req.block_table))

    def grow(self, req: EngineRequest, num_tokens: int) -> bool:
        """Take the blocks ``req`` needs to run ``num_tokens`` more tokens; False (taking none) when too few are free.
        Called for every running request every step: the common case (no new block) returns early."""
        need = -(-(req.num_computed + num_tokens) // self.block_size) - len(req.block_table)
        if need <= 0:
            return True
        if need > len(self._free) + self._cache.num_idle:
            return False
        for _ in range(need):
            req.block_table.append(self._take())
        return True

    def register_computed(self, req: EngineRequest) -> None:
        """Enter in the prefix cache ``req``'s full blocks whose K/V is now computed (after a step ran)."""
        if not self.prefix_caching or req.cache_key is None:
            return
        size = self.block_size
        done, parent = self._entered.get(req, _NOTHING_ENTERED)
        full = req.num_computed // size
        if full <= done:  # the common case (a decode step inside a block)
            return
        full = min(full, len(req.block_table))
        for i in range(done, full):
            block = req.block_table[i]
            entry = self._cache.entry(block)  # already cached: a hit, or a block shared with its fork parent
            if entry is None:
                tokens = tuple(req.token_slice(i * size, (i + 1) * size))
                entry = self._cache.enter(block, parent, req.cache_key, tokens)
            parent = entry
        if full > done:
            self._entered[req] = (full, parent)

    def free(self, req: EngineRequest) -> None:
        """Give back ``req``'s blocks, tail first: its cached tail becomes evictable before its cached head."""
        for block in reversed(req.block_table):
            self._refs[block] -= 1
            assert self._refs[block] >= 0
            if self._refs[block] == 0 and not self._cache.release(block):
                self._free.append(block)
        req.block_table = []
        self._entered.pop(req, None)

    def _extend(self, req: EngineRequest, positions: int) -> None:
        for _ in range(self.blocks_for(positions) - len(req.block_table)):
            req.block_table.append(self._take())

    def _take(self) -> int:
        """A block nobody holds: a plain free one, else the least recently released cached one (evicted)."""
        block = self._free.pop() if self._free else self._cache.evict()
        assert block is not None, "the KV pool ran out of blocks"
        self._refs[block] = 1
        return block
