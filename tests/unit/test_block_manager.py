"""The paged-KV block manager: refcounts, the exact-keyed prefix cache, its LRU eviction, and fork sharing."""

from collections.abc import Hashable

import pytest

from server.engine.block_manager import BlockManager, SharedPrefix
from server.engine.request import EngineRequest
from server.engine.sampling_params import SamplingParams


def request(tokens: list[int], key: Hashable | None = "a", prompt_logprobs: int | None = None) -> EngineRequest:
    params = SamplingParams(max_new_tokens=4, prompt_logprobs=prompt_logprobs)
    return EngineRequest("r", None, list(tokens), params, arrival=0.0, cache_key=key)


def run(blocks: BlockManager, req: EngineRequest, prefix: SharedPrefix | None = None) -> SharedPrefix:
    """Admit ``req`` from ``prefix`` (default: its prefix-cache lookup) and compute every token it has."""
    prefix = prefix if prefix is not None else blocks.lookup(req)
    blocks.admit(req, prefix, req.num_tokens - prefix.tokens)
    req.num_computed = req.num_tokens
    blocks.register_computed(req)
    return prefix


def test_blocks_are_taken_for_the_positions_run_and_given_back() -> None:
    blocks = BlockManager(8, 4)
    req = request(list(range(10)))
    blocks.admit(req, blocks.lookup(req), 5)  # a first chunk of 5 positions: 2 blocks
    assert req.block_table == [0, 1] and blocks.num_used == 2 and blocks.num_free == 6
    req.num_computed = 5
    assert blocks.blocks_needed(req, 3) == 0 and blocks.blocks_needed(req, 4) == 1
    assert blocks.grow(req, 5)
    assert req.block_table == [0, 1, 2] and blocks.num_used == 3
    other = request(list(range(20)), key="b")
    blocks.admit(other, blocks.lookup(other), 20)  # the other 5 blocks
    req.num_computed = 10
    assert not blocks.grow(req, 3) and req.block_table == [0, 1, 2]  # none free: nothing taken
    assert blocks.grow(req, 2)  # 12 positions fit in its 3 blocks
    blocks.free(other)
    blocks.free(req)
    assert req.block_table == [] and blocks.num_used == 0 and blocks.num_free == 8
    assert blocks.num_cached == 0  # nothing was computed: nothing cached


def test_a_later_request_on_the_same_key_reuses_the_cached_prefix_and_computes_the_rest() -> None:
    blocks = BlockManager(16, 4)
    first = request(list(range(10)))
    run(blocks, first)
    second = request([*range(8), 50, 51, 52])
    hit = blocks.lookup(second)
    assert hit.blocks == tuple(first.block_table[:2]) and hit.tokens == 8 and hit.idle == 0  # held by ``first``
    blocks.admit(second, hit, 3)
    assert second.block_table[:2] == first.block_table[:2] and len(second.block_table) == 3
    assert (blocks.query_tokens, blocks.hit_tokens) == (10 + 11, 8)


def test_prefixes_are_never_shared_across_cache_keys_or_without_one() -> None:
    blocks = BlockManager(16, 4)
    run(blocks, request(list(range(9)), key=("adapter", "a", 1)))
    assert blocks.lookup(request(list(range(9)), key=("adapter", "a", 1))).tokens == 8
    assert blocks.lookup(request(list(range(9)), key=("adapter", "a", 2))).tokens == 0  # a new generation
    assert blocks.lookup(request(list(range(9)), key=("base",))).tokens == 0
    assert blocks.lookup(request(list(range(9)), key=None)).tokens == 0
    run(blocks, request(list(range(100, 109)), key=None))  # no key: nothing entered
    assert blocks.lookup(request(list(range(100, 109)), key=None)).tokens == 0
    assert blocks.lookup(request(list(range(100, 109)), key="a")).tokens == 0


def test_keys_are_exact_the_same_tokens_after_a_different_prefix_miss() -> None:
    blocks = BlockManager(16, 4)
    x, y, z, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    run(blocks, request([*x, *y]))
    run(blocks, request([*z, *w]))
    assert blocks.lookup(request([*x, *y, 0])).tokens == 8
    assert blocks.lookup(request([*z, *y, 0])).tokens == 4  # y is cached, but after x: not a prefix of z + y


def test_at_least_one_token_is_left_to_compute_and_prompt_logprobs_get_no_hit() -> None:
    blocks = BlockManager(16, 4)
    run(blocks, request(list(range(12))))
    assert blocks.lookup(request(list(range(12)))).tokens == 8  # fully cached: the last block is computed again
    assert blocks.lookup(request(list(range(13)))).tokens == 12
    assert blocks.lookup(request(list(range(13)), prompt_logprobs=0)).tokens == 0


def test_a_hit_on_idle_blocks_takes_them_back_from_the_free_count() -> None:
    blocks = BlockManager(4, 4)
    first = request(list(range(8)))
    run(blocks, first)
    blocks.free(first)
    assert blocks.num_cached == 2 and blocks.num_free == 4 and blocks.num_used == 0
    again = request(list(range(9)))
    hit = blocks.lookup(again)
    assert hit.tokens == 8 and hit.idle == 2
    assert blocks.admission_blocks(hit, 1) == 3  # two idle cached blocks leave the free count, plus one new block
    blocks.admit(again, hit, 1)
    assert blocks.num_cached == 0 and blocks.num_used == 3 and blocks.num_free == 1


def test_cached_blocks_are_evicted_only_when_no_plain_block_is_left_tail_first() -> None:
    blocks = BlockManager(4, 2)
    old = request([1, 2, 3, 4, 5, 6])  # 3 full blocks, all cached once computed
    run(blocks, old)
    blocks.free(old)
    assert blocks.num_cached == 3 and blocks.num_free == 4
    taker = request(list(range(100, 104)), key="b")
    blocks.admit(taker, blocks.lookup(taker), 2)  # takes the plain free block: nothing evicted
    assert blocks.lookup(request([1, 2, 3, 4, 5, 6, 7])).tokens == 6
    taker.num_computed = 2
    assert blocks.grow(taker, 2)  # no plain block left: the least recently released cached block goes, old's tail
    assert blocks.lookup(request([1, 2, 3, 4, 5, 6, 7])).tokens == 4
    assert blocks.num_cached == 2 and blocks.num_free == 2


def test_the_least_recently_released_request_is_evicted_first() -> None:
    blocks = BlockManager(4, 2)
    first, second = request([1, 2, 3, 4]), request([5, 6, 7, 8])
    run(blocks, first)
    run(blocks, second)
    blocks.free(first)
    blocks.free(second)
    blocks.admit(request([9, 9, 9, 9], key="b"), SharedPrefix(), 4)
    assert blocks.lookup(request([1, 2, 3, 4, 0])).tokens == 0
    assert blocks.lookup(request([5, 6, 7, 8, 0])).tokens == 4


def test_a_prefix_hit_refreshes_the_blocks_place_in_the_lru() -> None:
    blocks = BlockManager(4, 2)
    first, second = request([1, 2, 3, 4]), request([5, 6, 7, 8])
    run(blocks, first)
    run(blocks, second)
    blocks.free(first)
    blocks.free(second)
    reuse = request([1, 2, 3, 4, 0])
    run(blocks, reuse)  # first's blocks are held again, then released after second's
    blocks.free(reuse)
    blocks.admit(request([9, 9, 9, 9], key="b"), SharedPrefix(), 4)  # takes reuse's own block, then second's 2
    assert blocks.lookup(request([5, 6, 7, 8, 0])).tokens == 0
    assert blocks.lookup(request([1, 2, 3, 4, 0])).tokens == 4


def test_a_block_computed_twice_stays_private_and_the_chain_goes_on_through_the_cached_copy() -> None:
    blocks = BlockManager(16, 4)
    one, two = request(list(range(9))), request(list(range(9)))
    blocks.admit(one, SharedPrefix(), 9)
    blocks.admit(two, SharedPrefix(), 9)  # admitted in the same step: both compute the whole prompt
    one.num_computed = 4
    blocks.register_computed(one)  # one's block 0 is the cached copy
    two.num_computed = 9
    blocks.register_computed(two)  # two's block 0 is the same key: private; its block 1 follows the cached block 0
    hit = blocks.lookup(request(list(range(9))))
    assert hit.blocks == (one.block_table[0], two.block_table[1])
    blocks.free(one)
    blocks.free(two)
    assert blocks.num_cached == 2 and blocks.num_free == 16  # two's block 0 went back to the plain free list


def test_a_fork_shares_full_blocks_and_copies_the_partial_last_one() -> None:
    blocks = BlockManager(16, 4, prefix_caching=False)  # forks share blocks with prefix caching off too
    parent = request(list(range(10)))
    run(blocks, parent)
    child = request(list(range(10)))
    copies = blocks.fork(parent, child, 9)
    assert child.block_table[:2] == parent.block_table[:2]
    assert copies == [(parent.block_table[2], child.block_table[2])] and len(child.block_table) == 3
    assert blocks.num_used == 4
    blocks.free(parent)
    assert blocks.num_used == 3  # the shared blocks stay with the child
    blocks.free(child)
    assert blocks.num_used == 0 and blocks.num_cached == 0


def test_a_fork_at_a_block_boundary_copies_nothing() -> None:
    blocks = BlockManager(16, 4)
    parent = request(list(range(9)))
    run(blocks, parent)
    child = request(list(range(9)))
    prefix = blocks.fork_prefix(parent, 8)
    assert blocks.admission_blocks(prefix, 1) == 1
    assert blocks.admit(child, prefix, 1) == [] and child.block_table[:2] == parent.block_table[:2]
    assert len(child.block_table) == 3 and blocks.num_used == 4
    assert (blocks.query_tokens, blocks.hit_tokens) == (9, 0)  # a fork is not a prefix-cache lookup


def test_without_prefix_caching_nothing_is_cached() -> None:
    blocks = BlockManager(8, 4, prefix_caching=False)
    first = request(list(range(9)))
    run(blocks, first)
    blocks.free(first)
    assert blocks.num_cached == 0 and blocks.lookup(request(list(range(9)))) == SharedPrefix()


def test_the_pool_needs_a_block() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
