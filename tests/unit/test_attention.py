"""The CPU decode-attention path equals PyTorch's SDPA, with grouped and ungrouped K/V heads."""

import pytest
import torch
import torch.nn.functional as F

from server.engine.attention import _grouped_decode_attention


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (9, 3)])
def test_grouped_decode_attention_equals_sdpa(heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    rows, length, dim = 5, 11, 8
    q = torch.randn(rows, heads, 1, dim, generator=g)
    k = torch.randn(rows, kv_heads, length, dim, generator=g)
    v = torch.randn(rows, kv_heads, length, dim, generator=g)
    contexts = torch.tensor([11, 1, 4, 7, 2])  # key 0 is always visible, as the runner guarantees
    mask = (torch.arange(length).unsqueeze(0) < contexts.unsqueeze(1)).view(rows, 1, 1, length)
    for scaling in (None, 0.3):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        torch.testing.assert_close(_grouped_decode_attention(q, k, v, mask, scaling), expected, atol=1e-5, rtol=1e-5)
