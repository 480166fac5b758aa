"""The torch paged decode attention: gather each sequence's blocks, then grouped attention. The reference every
fast kernel is tested against, and the fallback where none is usable (any device, any dtype)."""

import torch


def gather_blocks(pool: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of one sequence, in order: pool[blocks].flatten(positions)[:length].

    pool: [num_blocks, block_size, kv_heads, D]    blocks: [>= ceil(length / block_size)] int64
    -> [length, kv_heads, D] (a copy)
    """
    block_size = pool.shape[1]
    needed = -(-length // block_size)
    return pool[blocks[:needed]].flatten(0, 1)[:length]


def paged_decode_reference(
    out: torch.Tensor,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context: int,
    scale: float,
) -> None:
    """out[r, h] = softmax_j(scale * q[r, h] . K_r[j]) @ V_r[j] over j < context_lens[r], K_r[j] at
    pool[block_tables[r, j // bs], j % bs, h // (H / KV)], written into ``out``.

    out, q: [n, H, D]    k_pool, v_pool: [num_blocks, bs, KV, D]    block_tables: [n, max_blocks] int32/int64 (entries
    past a row's blocks must still be valid ids, e.g. 0)    context_lens: [n] int (>= 1)    max_context: the largest
    context length (host int, so no device sync). Query heads are grouped by the K/V head they share, never
    expanding K/V; float32 softmax.
    """
    rows, heads, dim = q.shape
    if rows == 0:
        return
    bs, kv_heads = k_pool.shape[1], k_pool.shape[2]
    needed = -(-max_context // bs)
    tables = block_tables[:, :needed].long()
    k = k_pool[tables].flatten(1, 2)[:, :max_context].transpose(1, 2)  # [n, KV, L, D]
    v = v_pool[tables].flatten(1, 2)[:, :max_context].transpose(1, 2)
    visible = torch.arange(max_context, device=q.device) < context_lens.to(q.device).view(rows, 1)  # [n, L]
    # Positions past a row's context may hold anything a block last held (or padding blocks): zero V there, since
    # a zero weight times a non-finite value would still poison the sum.
    v = v.masked_fill(~visible.view(rows, 1, max_context, 1), 0)
    scores = torch.matmul(q.view(rows, kv_heads, heads // kv_heads, dim).float(), k.float().transpose(-1, -2))
    scores.mul_(scale).masked_fill_(~visible.view(rows, 1, 1, max_context), float("-inf"))  # [n, KV, G, L]
    res = torch.matmul(scores.softmax(dim=-1), v.float())  # [n, KV, G, D]
    out.copy_(res.view(rows, heads, dim))
