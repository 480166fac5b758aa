"""``paged_decode_triton``: paged decode attention by a Triton kernel (CUDA; CPU tensors only under Triton's
interpreter, ``TRITON_INTERPRET=1``, as the tests run it). Same semantics as ``reference.paged_decode_reference``;
the kernel is in ``triton_kernels``. Triton is imported on first use, so this module imports without it."""

import functools

import torch

from server.kernels.triton.ops import TRITON_AVAILABLE, interpreting, kernels

__all__ = ["TRITON_AVAILABLE", "paged_decode_triton", "triton_decode_usable"]


@functools.cache
def triton_decode_usable() -> bool:
    """Whether triton imports here (checked once, by ``select_decode`` on CUDA)."""
    try:
        kernels()  # the LoRA kernels' import: the same triton
        from server.kernels.attention import triton_kernels  # noqa: F401
    except Exception:  # a broken install counts as no triton: the torch path serves
        return False
    return True


def _pow2(n: int) -> int:
    """The smallest power of two >= n (and >= 16): ``tl.arange`` lengths; the lanes past n are masked."""
    return max(16, 1 << (n - 1).bit_length())


def paged_decode_triton(
    out: torch.Tensor,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context: int,
    scale: float,
) -> None:
    """out[r, h] = softmax_j(scale * q[r, h] . K_r[j]) @ V_r[j], j < context_lens[r] (see the reference).

    out, q: [n, H, D] (last dim contiguous)    k_pool, v_pool: [num_blocks, bs, KV, D] contiguous, same strides
    block_tables: [n, max_blocks] int32 contiguous    context_lens: [n] int32, all on one device (CUDA, or the CPU
    under the interpreter); any float dtype, float32 softmax. ``max_context`` is unused (no host sync).
    """
    rows, heads, dim = q.shape
    if rows == 0:
        return
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("the Triton paged attention kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    from server.kernels.attention.triton_kernels import paged_decode_kernel

    _, bs, kv_heads, _ = k_pool.shape
    if k_pool.stride() != v_pool.stride() or q.stride(2) != 1 or out.stride(2) != 1 or k_pool.stride(3) != 1:
        raise ValueError("the Triton paged attention kernel needs K and V pools of one layout and contiguous heads")
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    paged_decode_kernel[(rows, heads)](
        out, q, k_pool, v_pool, block_tables, context_lens, scale,
        block_tables.shape[1], bs, dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        GROUP=heads // kv_heads, BLOCK_S=_pow2(bs), BLOCK_D=_pow2(dim),
    )  # fmt: skip
