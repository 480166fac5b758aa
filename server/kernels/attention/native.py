"""``paged_decode_native``: paged decode attention by the C kernel ``paged_decode.c`` (CPU; float32 or bfloat16).

Same semantics as ``reference.paged_decode_reference``. bfloat16 tensors are read as float32 (exact), every sum and
the softmax run in float32, and the output is rounded to nearest even, as the reference's float32 result copied
into a bfloat16 ``out`` is. float16 has no C path (it stays on the torch path). Built and loaded like the C LoRA
kernel (``native/build.py``: compiled for this CPU on first use, OpenMP on torch's thread pool); chosen by
``select_decode`` per dtype only when it builds and passes ``native_decode_usable``'s check against the reference.
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
ENTRY_POINTS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}  # dtypes the kernel serves
# Self-check tolerances. bfloat16: both sides round float32 results that differ by float32 summation order only,
# so they agree to one bfloat16 ulp (at most 2**-7 relative); 1.6e-2 (torch's own bfloat16 default) leaves room for two.
SELF_CHECK_TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1.6e-2)}  # (atol, rtol)


@functools.cache
def decode_library() -> CompiledLibrary | None:
    """The process-wide kernel, built at most once; None (with the reason logged) where it cannot be built."""
    try:
        lib = load_source(SOURCE)
    except (NativeBuildError, OSError) as exc:  # OSError: e.g. a read-only cache folder
        log.warning("native paged attention kernel unavailable, using the torch path: %s", exc)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ENTRY_POINTS.values():
        fn = getattr(lib.cdll, name)
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

    out, q: [n, H, D]    k_pool, v_pool: [num_blocks, bs, KV, D], all four of one dtype (float32 or bfloat16) and
    contiguous    block_tables: [n, max_blocks] int32    context_lens: [n] int32, all on the CPU. float32 arithmetic
    for either dtype. ``max_context`` is unused (the kernel reads each row's own length). Raises ValueError (writing
    nothing) on an out-of-range block id or length, TypeError on another dtype.
    """
    rows, heads, dim = q.shape
    if rows == 0:
        return
    lib = decode_library()
    if lib is None:
        raise RuntimeError("the native paged attention kernel is not available here (select_decode checks this)")
    tensors = (out, q, k_pool, v_pool)
    entry = ENTRY_POINTS.get(q.dtype)
    if entry is None or any(t.dtype != q.dtype for t in tensors):
        raise TypeError("the native paged attention kernel takes float32 or bfloat16 tensors, all of one dtype")
    if not all(t.is_contiguous() for t in (*tensors, block_tables, context_lens)):
        raise ValueError("the native paged attention kernel needs contiguous tensors")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError("block tables and context lengths must be int32")
    if out.shape != q.shape or block_tables.shape[0] != rows or context_lens.shape[0] != rows:
        raise ValueError("out, q, block_tables and context_lens must have one entry per row")
    num_blocks, bs, kv_heads, _ = k_pool.shape
    status = getattr(lib.cdll, entry)(
        out.data_ptr(), q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), rows, heads, kv_heads, dim, bs, num_blocks, scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise ValueError("native paged attention: a block id, context length or shape is out of range")


@functools.cache
def native_decode_usable(dtype: torch.dtype = torch.float32) -> bool:
    """The kernel serves ``dtype``, builds here, and equals the reference in that dtype on a small case covering its
    edge paths (GQA, partial last blocks, scattered block ids, a head dim off the vector width)."""
    if dtype not in ENTRY_POINTS or decode_library() is None:
        return False
    g = torch.Generator().manual_seed(0)
    num_blocks, bs, kv_heads, heads, dim = 13, 4, 2, 6, 20
    k_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g).to(dtype)
    contexts = [1, 9, 16, 5]
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:4] for _ in contexts]).to(torch.int32)
    q = torch.randn(len(contexts), heads, dim, generator=g).to(dtype)
    ctx = torch.tensor(contexts, dtype=torch.int32)
    expected, got = torch.empty_like(q), torch.empty_like(q)
    paged_decode_reference(expected, q, k_pool, v_pool, tables, ctx, max(contexts), 0.3)
    try:
        paged_decode_native(got, q, k_pool, v_pool, tables, ctx, max(contexts), 0.3)
    except (RuntimeError, ValueError) as exc:
        log.warning("native paged attention (%s) failed its self-check, using the torch path: %s", dtype, exc)
        return False
    atol, rtol = SELF_CHECK_TOLERANCE[dtype]
    if not torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol):
        error = (got.float() - expected.float()).abs().max().item()
        log.warning("native paged attention (%s) disagrees with the reference (error %.3g), using torch", dtype, error)
        return False
    return True
