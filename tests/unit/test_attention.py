"""The decode-attention paths equal PyTorch's SDPA on contiguous K/V, with grouped and ungrouped K/V heads: every
row's keys scattered over a shuffled block pool, read back through its block table."""

import pytest
import torch
import torch.nn.functional as F

from server.kernels.attention.native import native_decode_usable
from server.kernels.attention.select import DECODE_KERNELS

CPU_KERNELS = ["torch", "native"]


def scatter_into_pool(
    k: torch.Tensor, v: torch.Tensor, block_size: int, spare: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v [W, KV, L, D] -> pools [N, bs, KV, D] holding row w's positions in shuffled blocks, and the tables."""
    rows, kv_heads, length, dim = k.shape
    per_row = -(-length // block_size)
    num_blocks = rows * per_row + spare
    order = torch.randperm(num_blocks, generator=g)
    tables = order[: rows * per_row].view(rows, per_row)
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)  # unused positions hold noise
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    for w in range(rows):
        for j in range(length):
            block, offset = tables[w, j // block_size], j % block_size
            k_pool[block, offset] = k[w, :, j]
            v_pool[block, offset] = v[w, :, j]
    return k_pool, v_pool, tables.to(torch.int32)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (9, 3)])
def test_paged_decode_equals_sdpa(kernel: str, heads: int, kv_heads: int) -> None:
    if kernel == "native" and not native_decode_usable():
        pytest.skip("no native paged attention kernel on this machine")
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    rows, length, dim, block_size = 5, 11, 8, 4
    q = torch.randn(rows, heads, 1, dim, generator=g)
    k = torch.randn(rows, kv_heads, length, dim, generator=g)
    v = torch.randn(rows, kv_heads, length, dim, generator=g)
    contexts = torch.tensor([11, 1, 4, 7, 2])
    mask = (torch.arange(length).unsqueeze(0) < contexts.unsqueeze(1)).view(rows, 1, 1, length)
    k_pool, v_pool, tables = scatter_into_pool(k, v, block_size, spare=3, g=g)
    for scaling in (dim**-0.5, 0.3):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)[:, :, 0]
        got = torch.full_like(expected, float("nan"))
        DECODE_KERNELS[kernel](got, q[:, :, 0].contiguous(), k_pool, v_pool, tables, contexts.to(torch.int32),
                               int(contexts.max()), scaling)  # fmt: skip
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
