"""Triton kernels of the batched LoRA add; imported only through ``server.kernels.triton.ops`` (which guards triton).

- SGMV (segmented, for prefill), two launches: a *shrink* ``part[k, t] = x[t, k-chunk] @ A[s_t, :, k-chunk].T``
  (float32 partial sums, one per split of the reduction) and an *expand* ``y[t] += (scale * sum_k part[k, t]) @
  B[s_t]``. Programs own blocks of up to ``BLOCK_M`` tokens of one slot, listed in a block table ``blocks[i] =
  (slot, start, end)`` of positions; position ``p`` is token ``order[p]`` when ``GATHERED`` else ``p``. Both
  matmuls are ``tl.dot`` tiles, so an adapter's weights are read once per block, not once per token.
- BGMV (gathered, for decode), one launch: a program per (token, slice of output columns) reads the token's slot
  from ``token_slots``, computes its ``x @ A.T`` row and adds that row times its slice of ``B``. Decode is bound by
  launches and by reading each adapter's weights once, so one launch and no partials in memory is what it wants.

A and B are the adapter pools ([N+1, in], [N+1, out]); slot ``s`` holds rows ``o .. o + r - 1`` with ``(o, r) =
table[s]`` ([S+1, 2] int32). Rank lanes past ``r`` are masked off (their rows never read), and tokens of the base
slot or of a slot with rank 0 for this layer are never written. ``UPCAST_DOT`` makes ``tl.dot`` take float32 operands:
Triton's interpreter (CPU, tests) computes 16-bit ``tl.dot`` wrongly (bfloat16 garbage in triton 3.9), while the
GPU path keeps 16-bit tensor-core inputs.
"""

import triton
import triton.language as tl


@triton.jit
def _sgmv_block(blocks_ptr, order_ptr, table_ptr, blk, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                GATHERED: tl.constexpr):  # fmt: skip
    """Block ``blk`` of the SGMV block table: its slot, the slot's rank, its token indices and row mask, the rank
    lanes, their pool rows and their mask (rows past the rank are never read)."""
    slot = tl.load(blocks_ptr + 3 * blk).to(tl.int64)
    start = tl.load(blocks_ptr + 3 * blk + 1)
    end = tl.load(blocks_ptr + 3 * blk + 2)
    offset = tl.load(table_ptr + 2 * slot).to(tl.int64)
    rank = tl.load(table_ptr + 2 * slot + 1)
    pos = start + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    if GATHERED:
        tok = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    else:
        tok = pos.to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    return slot, rank, tok, row_ok, r, offset + r, r < rank


@triton.jit
def sgmv_shrink_kernel(
    x_ptr, a_ptr, part_ptr, blocks_ptr, order_ptr, table_ptr,
    K, SPLIT_K,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_ps, stride_pt,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    GATHERED: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """part[pid_k, tok(p), :] = x[tok(p), k-chunks of pid_k] @ A[o:o+r, same].T for the block's positions p."""
    blk = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot, rank, tok, row_ok, r, rows, r_ok = _sgmv_block(
        blocks_ptr, order_ptr, table_ptr, blk, BLOCK_M, BLOCK_R, GATHERED
    )
    if rank == 0:
        return
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(
            x_ptr + tok[:, None] * stride_xt + k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]
        at = tl.load(
            a_ptr + rows[:, None] * stride_ar + k[None, :] * stride_ak,
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_K]
        if UPCAST_DOT:
            acc += tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)), input_precision=PRECISION)
        else:
            acc += tl.dot(xt.to(at.dtype), tl.trans(at), input_precision=PRECISION)
    tl.store(part_ptr + pid_k * stride_ps + tok[:, None] * stride_pt + r[None, :], acc, mask=row_ok[:, None])


@triton.jit
def sgmv_expand_kernel(
    part_ptr, b_ptr, scale_ptr, y_ptr, blocks_ptr, order_ptr, table_ptr,
    N, SPLIT_K,
    stride_ps, stride_pt, stride_br, stride_bn, stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHERED: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """y[tok(p), n-block] += (scale[slot] * sum_k part[k, tok(p)]) @ B[o:o+r, n-block] for the block's positions."""
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, rank, tok, row_ok, r, rows, r_ok = _sgmv_block(
        blocks_ptr, order_ptr, table_ptr, blk, BLOCK_M, BLOCK_R, GATHERED
    )
    if rank == 0:
        return
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(SPLIT_K):
        xa += tl.load(
            part_ptr + k * stride_ps + tok[:, None] * stride_pt + r[None, :],
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
    xa = xa * tl.load(scale_ptr + slot).to(tl.float32)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    bt = tl.load(
        b_ptr + rows[:, None] * stride_br + n[None, :] * stride_bn,
        mask=r_ok[:, None] & n_ok[None, :],
        other=0.0,
    )  # [BLOCK_R, BLOCK_N]
    if UPCAST_DOT:
        out = tl.dot(xa, bt.to(tl.float32), input_precision=PRECISION)
    else:
        out = tl.dot(xa.to(bt.dtype), bt, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    y_ptrs = y_ptr + tok[:, None] * stride_yt + n[None, :] * stride_yn
    mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + out).to(y.dtype), mask=mask)


@triton.jit
def bgmv_kernel(
    x_ptr, a_ptr, b_ptr, scale_ptr, y_ptr, slots_ptr, table_ptr,
    K, N, N_PER_PROGRAM,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_br, stride_bn, stride_yt, stride_yn,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BASE: tl.constexpr,
):  # fmt: skip
    """y[t, cols] += (scale[s] * x[t] @ A[o:o+r].T) @ B[o:o+r, cols] with s = slots[t], (o, r) = table[s]; program
    (t, j) owns the columns j * N_PER_PROGRAM .. + N_PER_PROGRAM and computes the token's [R] row of x @ A.T itself
    (one launch per layer).
    """
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot == BASE:
        return
    rank = tl.load(table_ptr + 2 * slot + 1)
    if rank == 0:
        return
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    rows = tl.load(table_ptr + 2 * slot).to(tl.int64) + r
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xv = tl.load(x_ptr + t * stride_xt + k * stride_xk, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        at = tl.load(
            a_ptr + rows[:, None] * stride_ar + k[None, :] * stride_ak,
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_R, BLOCK_K]
        acc += tl.sum(at * xv[None, :], axis=1)
    xa = acc * tl.load(scale_ptr + slot).to(tl.float32)  # [BLOCK_R]
    n_start = pid_n * N_PER_PROGRAM
    for n0 in range(n_start, n_start + N_PER_PROGRAM, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        bt = tl.load(
            b_ptr + rows[:, None] * stride_br + n[None, :] * stride_bn,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_R, BLOCK_N]
        out = tl.sum(xa[:, None] * bt, axis=0)  # [BLOCK_N]
        y_ptrs = y_ptr + t * stride_yt + n * stride_yn
        y = tl.load(y_ptrs, mask=n_ok, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + out).to(y.dtype), mask=n_ok)
