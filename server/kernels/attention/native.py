"""``paged_decode_native``: paged decode attention by the C kernel ``paged_decode.c`` (float32, CPU).

Same semantics as ``reference.paged_decode_reference``. Built and loaded like the C LoRA kernel (``native/build.py``:
compiled for this CPU on first use, OpenMP on torch's thread pool); chosen by ``select_decode`` only when it builds
and passes ``native_decode_usable``'s check against the reference here.
"""

import ctypes
import functools
import logging
from pathlib import Path

import torch

from server.kernels.attention.reference import paged_decode_reference
from server.kernels.native.build import CompiledLibrary, NativeBuildError, load_source

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "paged_decode.c"


@functools.cache
def decode_library() -> CompiledLibrary | None:
    """The process-wide kernel, built at most once; None (with the reason logged) where it cannot be built."""
    try:
        lib = load_source(SOURCE)
    except (NativeBuildError, OSError) as exc:  # OSError: e.g. a read-only cache folder
        log.warning("native paged attention kernel unavailable, using the torch path: %s", exc)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = lib.cdll.paged_decode_f32
    # out, q, k_pool, v_pool, tables, table_stride, ctx, n, heads, kv_heads, dim, bs, num_blocks, scale, threads
    fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def paged_decode_native(
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

    out, q: [n, H, D] float32, contiguous    k_pool, v_pool: [num_blocks, bs, KV, D] float32, contiguous
    block_tables: [n, max_blocks] int32    context_lens: [n] int32, all on the CPU. ``max_context`` is unused (the
    kernel reads each row's own length). Raises ValueError (writing nothing) on an out-of-range block id or length.
    """
    rows, heads, dim = q.shape
    if rows == 0:
        return
    lib = decode_library()
    if lib is None:
        raise RuntimeError("the native paged attention kernel is not available here (select_decode checks this)")
    tensors = (out, q, k_pool, v_pool)
    if any(t.dtype != torch.float32 for t in tensors):
        raise TypeError("the native paged attention kernel takes float32 tensors only")
    if not all(t.is_contiguous() for t in (*tensors, block_tables, context_lens)):
        raise ValueError("the native paged attention kernel needs contiguous tensors")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError("block tables and context lengths must be int32")
    if out.shape != q.shape or block_tables.shape[0] != rows or context_lens.shape[0] != rows:
        raise ValueError("out, q, block_tables and context_lens must have one entry per row")
    num_blocks, bs, kv_heads, _ = k_pool.shape
    status = lib.cdll.paged_decode_f32(
        out.data_ptr(), q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), rows, heads, kv_heads, dim, bs, num_blocks, scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise ValueError("native paged attention: a block id, context length or shape is out of range")


@functools.cache
def native_decode_usable() -> bool:
    """The kernel builds here and equals the reference on a small case covering its edge paths (GQA, partial
    last blocks, scattered block ids, a head dim off the vector width)."""
    if decode_library() is None:
        return False
    g = torch.Generator().manual_seed(0)
    num_blocks, bs, kv_heads, heads, dim = 13, 4, 2, 6, 20
    k_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    v_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    contexts = [1, 9, 16, 5]
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:4] for _ in contexts]).to(torch.int32)
    q = torch.randn(len(contexts), heads, dim, generator=g)
    ctx = torch.tensor(contexts, dtype=torch.int32)
    expected, got = torch.empty_like(q), torch.empty_like(q)
    paged_decode_reference(expected, q, k_pool, v_pool, tables, ctx, max(contexts), 0.3)
    try:
        paged_decode_native(got, q, k_pool, v_pool, tables, ctx, max(contexts), 0.3)
    except (RuntimeError, ValueError) as exc:
        log.warning("native paged attention failed its self-check, using the torch path: %s", exc)
        return False
    if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
        error = (got - expected).abs().max().item()
        log.warning("native paged attention disagrees with the reference (max error %.3g), using torch", error)
        return False
    return True
