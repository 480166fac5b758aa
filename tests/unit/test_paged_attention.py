"""Paged attention: the block pool, the C decode kernel against the torch reference, and ``cached_attention`` over
steps of mixed prefill/decode chunks equal to plain causal attention over each whole sequence."""

import random

import pytest
import torch
import torch.nn.functional as F

from server.engine.attention import AttentionContext, AttentionMetadata, PrefillSegment, cached_attention
from server.engine.kv_cache import PagedKVCache
from server.kernels.attention.native import native_decode_usable, paged_decode_native
from server.kernels.attention.reference import paged_decode_reference
from server.kernels.attention.select import DECODE_KERNELS, select_decode

needs_native = pytest.mark.skipif(not native_decode_usable(), reason="no native paged attention kernel here")


def random_case(seed: int, heads: int, kv_heads: int, dim: int, bs: int, contexts: list[int], spare: int = 5):
    """q [n, H, D], k/v pools [blocks, bs, KV, D] (float32 normals), shuffled int32 tables with a padding column,
    int32 context lengths. Shared with the bfloat16 tests."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-c // bs) for c in contexts) + 1  # one padding column
    num_blocks = len(contexts) * width + spare
    k_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    v_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(contexts) * width].view(len(contexts), width)
    q = torch.randn(len(contexts), heads, dim, generator=g)
    return q, k_pool, v_pool, tables.to(torch.int32), torch.tensor(contexts, dtype=torch.int32)


# (heads, kv_heads, dim, bs, contexts): the decode kernels' edge paths, shared with the bfloat16 tests.
DECODE_SHAPES = [
    (9, 3, 64, 16, [300, 1, 17, 16, 33]),  # SmolLM2 shapes, partial last blocks, exactly one block
    (32, 8, 128, 16, [5, 70]),  # Llama-3-8B shapes
    (4, 4, 16, 1, [1, 9]),  # blocks of one position
    (6, 2, 20, 5, [12, 3, 25]),  # head dim and block size off the vector width
    (8, 1, 8, 7, [40]),  # multi-query
]


@needs_native
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "bs", "contexts"), DECODE_SHAPES)
def test_native_equals_reference(heads: int, kv_heads: int, dim: int, bs: int, contexts: list[int]) -> None:
    q, k_pool, v_pool, tables, ctx = random_case(heads + dim + bs, heads, kv_heads, dim, bs, contexts)
    expected, got = torch.empty_like(q), torch.full_like(q, float("nan"))
    paged_decode_reference(expected, q, k_pool, v_pool, tables, ctx, max(contexts), 0.125)
    paged_decode_native(got, q, k_pool, v_pool, tables, ctx, max(contexts), 0.125)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@needs_native
def test_native_threads_agree_with_one_thread() -> None:
    q, k_pool, v_pool, tables, ctx = random_case(1, 9, 3, 64, 16, [100, 3, 47, 64, 1, 200])
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.empty_like(q)
            paged_decode_native(out, q, k_pool, v_pool, tables, ctx, 200, 0.125)
            results.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])  # jobs are independent: the thread count changes no sum


@needs_native
def test_native_refuses_bad_input() -> None:
    q, k_pool, v_pool, tables, ctx = random_case(2, 4, 2, 16, 4, [5, 8])
    out = torch.zeros_like(q)
    bad = tables.clone()
    bad[1, 0] = k_pool.shape[0]  # a block id past the pool
    with pytest.raises(ValueError, match="out of range"):
        paged_decode_native(out, q, k_pool, v_pool, bad, ctx, 8, 1.0)
    with pytest.raises(ValueError, match="out of range"):  # a context longer than the table
        paged_decode_native(out, q, k_pool, v_pool, tables, torch.tensor([5, 99], dtype=torch.int32), 99, 1.0)
    with pytest.raises(TypeError):
        paged_decode_native(out, q, k_pool, v_pool, tables.long(), ctx, 8, 1.0)
    assert not out.any()  # nothing was written


def test_select_decode() -> None:
    expected = "native" if native_decode_usable() else "torch"
    assert select_decode(torch.device("cpu"), torch.float32) == expected  # bfloat16: test_paged_attention_bf16.py


def test_cache_write_copy_and_sizes() -> None:
    cache = PagedKVCache(2, 6, 4, 3, 8, torch.float32, torch.device("cpu"))
    assert cache.nbytes == 2 * 2 * 6 * 4 * 3 * 8 * 4
    cache.k.normal_(), cache.v.normal_()  # the pool starts uninitialised: a stray NaN would fail torch.equal below
    k, v = torch.randn(3, 3, 8), torch.randn(3, 3, 8)
    cache.write(1, torch.tensor([4 * 2 + 1, 4 * 5 + 3, 0]), k, v)  # block 2 offset 1, block 5 offset 3, block 0
    assert torch.equal(cache.k[1, 2, 1], k[0]) and torch.equal(cache.v[1, 5, 3], v[1])
    assert torch.equal(cache.k[1, 0, 0], k[2])
    before = cache.k.clone()
    cache.copy_blocks([(2, 3), (5, 4)])
    assert torch.equal(cache.k[:, 3], before[:, 2]) and torch.equal(cache.k[:, 4], before[:, 5])
    assert torch.equal(cache.v[:, 3], cache.v[:, 2])
    assert torch.equal(cache.k[:, :3], before[:, :3])  # sources untouched

    class Config:
        num_attention_heads, num_key_value_heads, hidden_size, num_hidden_layers = 9, 3, 576, 30

    # SmolLM2-135M: 16 positions x 30 layers x (K and V) x 3 heads x 64 dims x 4 bytes
    assert PagedKVCache.block_bytes(Config(), 16, torch.float32) == 16 * 30 * 2 * 3 * 64 * 4  # type: ignore[arg-type]


# ---- cached_attention over steps ------------------------------------------------------------------------------
class _Attention(torch.nn.Module):
    def __init__(self, context: AttentionContext) -> None:
        super().__init__()
        self.layer_idx = 0
        self.lora_server_attention = context


def _metadata(steps: list[tuple[int, int, int]], tables: list[list[int]], bs: int) -> AttentionMetadata:
    """The runner's layout: the single-token chunks first, then prompt chunks. steps: (sequence, start, end)."""
    decodes = [s for s in steps if s[2] - s[1] == 1]
    prefills, slot_index, at = [], [], len(decodes)
    for seq, start, _ in decodes:
        slot_index.append(tables[seq][start // bs] * bs + start % bs)
    for seq, start, end in (s for s in steps if s[2] - s[1] > 1):
        slot_index.extend(tables[seq][p // bs] * bs + p % bs for p in range(start, end))
        blocks = None if start == 0 else torch.tensor(tables[seq], dtype=torch.int64)
        prefills.append(PrefillSegment(at, at + end - start, end, blocks))
        at += end - start
    width = max((len(tables[s]) for s, _, _ in decodes), default=0)
    return AttentionMetadata(
        slot_index=torch.tensor(slot_index),
        prefills=tuple(prefills),
        num_decodes=len(decodes),
        block_tables=torch.tensor(
            [tables[s] + [0] * (width - len(tables[s])) for s, _, _ in decodes], dtype=torch.int32
        ).view(len(decodes), width),
        context_lens=torch.tensor([e for _, _, e in decodes], dtype=torch.int32),
        max_context=max((e for _, _, e in decodes), default=0),
    )


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize(("heads", "kv_heads", "bs"), [(9, 3, 16), (4, 2, 4), (4, 4, 3)])
def test_cached_attention_equals_causal_attention(kernel: str, heads: int, kv_heads: int, bs: int) -> None:
    """Mixed steps (fresh prompts, chunked prefill, a chunk after a shared prefix, decodes, one-token prompt chunks)
    with shuffled block tables: every token's output equals causal SDPA over its whole sequence."""
    if kernel == "native" and not native_decode_usable():
        pytest.skip("no native paged attention kernel here")
    dim, rng = 16, random.Random(heads + bs)
    g = torch.Generator().manual_seed(heads + bs)
    lengths = [23, 9, 30, 18]
    qs = [torch.randn(heads, n, dim, generator=g) for n in lengths]
    ks = [torch.randn(kv_heads, n, dim, generator=g) for n in lengths]
    vs = [torch.randn(kv_heads, n, dim, generator=g) for n in lengths]
    # Sequence 3 shares sequence 2's first 8 positions (a prefix-cache hit on whole blocks when bs divides 8).
    shared = 8 // bs * bs
    ks[3][:, :shared], vs[3][:, :shared] = ks[2][:, :shared], vs[2][:, :shared]
    ids = list(range(sum(-(-n // bs) for n in lengths) + 4))
    rng.shuffle(ids)
    tables: list[list[int]] = []
    for n in lengths:
        tables.append([ids.pop() for _ in range(-(-n // bs))])
    tables[3][: shared // bs] = tables[2][: shared // bs]
    cache = PagedKVCache(1, len(tables) * 10 + 8, bs, kv_heads, dim, torch.float32, torch.device("cpu"))
    module = _Attention(AttentionContext(cache, max_len=64, decode_kernel=kernel))
    steps = [
        [(0, 0, 10), (1, 0, 9), (2, 0, 20)],  # fresh prompts
        [(0, 10, 11), (2, 20, 21), (3, shared, 12)],  # decodes, a chunk after a shared prefix
        [(0, 11, 12), (2, 21, 22), (3, 12, 13)],  # decodes, a one-token prompt chunk
        [(3, 13, 17), (0, 12, 23), (2, 22, 23)],  # chunked prefill of several tokens
        [(2, 23, 30), (3, 17, 18)],
    ]
    for step in steps:
        meta = _metadata(step, tables, bs)
        order = [s for s in step if s[2] - s[1] == 1] + [s for s in step if s[2] - s[1] > 1]
        query = torch.cat([qs[s][:, a:b] for s, a, b in order], dim=1).unsqueeze(0)  # [1, H, T, D]
        key = torch.cat([ks[s][:, a:b] for s, a, b in order], dim=1).unsqueeze(0)
        value = torch.cat([vs[s][:, a:b] for s, a, b in order], dim=1).unsqueeze(0)
        module.lora_server_attention.metadata = meta
        out, _ = cached_attention(module, query, key, value, None, scaling=0.25)
        at = 0
        for s, a, b in order:
            full = F.scaled_dot_product_attention(
                qs[s][:, :b].unsqueeze(0), ks[s][:, :b].unsqueeze(0), vs[s][:, :b].unsqueeze(0),
                is_causal=True, scale=0.25, enable_gqa=True,
            )[0, :, a:b].transpose(0, 1)  # fmt: skip
            torch.testing.assert_close(out[0, at : at + b - a], full, atol=1e-5, rtol=1e-5)
            at += b - a


def test_every_decode_kernel_is_registered() -> None:
    assert set(DECODE_KERNELS) == {"torch", "native", "triton"}
