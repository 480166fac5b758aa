"""The Triton paged decode kernel; imported only through ``server.kernels.attention.triton_decode`` (guards triton).

One program per (row, query head): it loads the row's query, walks the row's block table one block of
``BLOCK_S`` positions at a time (keys [BLOCK_S, D] of its kv head straight from the pool), and keeps an online
softmax in float32 (running max ``m``, sum ``l``, accumulator ``acc``). Products are ``tl.sum`` reductions, not
``tl.dot``: one query row has nothing to tile, and the interpreter computes them exactly.
"""

import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, scale,
    table_stride, block_size, head_dim,
    stride_qn, stride_qh, stride_on, stride_oh, stride_kb, stride_ks, stride_kh,
    GROUP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[row, head] = softmax_j(scale * q[row, head] . K[j]) @ V[j] over the row's keys j < ctx[row]."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + row * stride_qn + head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    ctx = tl.load(ctx_ptr + row)
    offs = tl.arange(0, BLOCK_S)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for b in range(0, tl.cdiv(ctx, block_size)):
        blk = tl.load(tables_ptr + row * table_stride + b).to(tl.int64)
        pos_ok = (offs < block_size) & (b * block_size + offs < ctx)
        base = blk * stride_kb + kvh * stride_kh + offs[:, None] * stride_ks + d[None, :]
        tile_ok = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base, mask=tile_ok, other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        s = tl.where(pos_ok, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        fix = tl.exp(m - m_new)
        v = tl.load(v_ptr + base, mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * fix + tl.sum(p[:, None] * v, axis=0)
        total = total * fix + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + row * stride_on + head * stride_oh + d, (acc / total).to(out_ptr.dtype.element_ty), mask=d_ok)
