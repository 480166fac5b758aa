"""``lora_add_native``: the batched LoRA add on CPU by the C kernel, all runs of one layer in one call (float32, or
bfloat16 by the kernel's twin ``lora_runs_bf16.c``: the tensors' dtype picks which).

Same semantics as ``reference.lora_add_reference``. The torch op pays two matmul dispatches per run and layer, each a
tiny GEMM whose cost is mostly overhead; this op hands the step's run table to ``lora_runs.c`` once per
layer. It is chosen by ``select_op`` when the kernel of the model's dtype builds and passes ``native_usable``'s
check against the reference on this machine; otherwise the torch op serves.
"""

import functools
import logging
from dataclasses import dataclass

import torch

from server.kernels.mapping import TokenSlotMapping
from server.kernels.native.build import shared_bf16_library, shared_library
from server.kernels.protocol import LoraWeights

log = logging.getLogger(__name__)


NATIVE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class NativeMeta:
    run_table: torch.Tensor  # [n, 3] int32 on the host: every adapter run as (slot, start, end)


class NativeOp:
    """The ``LoraOp`` of the C kernel: every run of a layer in one call."""

    def prepare(self, mapping: TokenSlotMapping) -> NativeMeta:
        return NativeMeta(torch.tensor(mapping.runs, dtype=torch.int32).reshape(-1, 3))

    def add(self, y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, meta: NativeMeta) -> None:
        """y[t] += scales[s] * (x[t] @ a[o:o+r].T) @ b[o:o+r] for every run of ``meta.run_table``, in place.

        y: [T, out]  x: [T, in], float32 or bfloat16 on the CPU; (o, r) of each slot from ``weights.slot_table``.
        """
        lora_add_native(y, x, weights.a, weights.b, weights.scales, weights.slot_table, meta.run_table)


def lora_add_native(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    slot_table: torch.Tensor,
    run_table: torch.Tensor,
) -> None:
    """y[t] += scales[s] * (x[t] @ a[o:o+r].T) @ b[o:o+r] for every t in start..end-1 of each run, in place.

    y: [T, out]  x: [T, in]  a: [N, in]  b: [N, out] (the pool)  scales: [S+1], all float32 or all bfloat16 on the
    CPU (bfloat16: float32 products and sums, x @ A.T kept in float32, y rounded once to nearest even)
    slot_table: [S+1, 2] int32 (o, r = slot_table[s])  run_table: [n, 3] int32 (slot, start, end), both on the host.
    Rows of y and x may be strided; columns not.
    """
    if run_table.shape[0] == 0:
        return
    dtype = x.dtype
    if not (dtype == y.dtype == a.dtype == b.dtype == scales.dtype and dtype in NATIVE_DTYPES):
        raise TypeError("the native LoRA op takes float32 or bfloat16 tensors, all of one dtype")
    if dtype == torch.float32:
        lib = shared_library()
        kernel = None if lib is None else lib.lora_add_runs_f32
    else:
        lib_bf16 = shared_bf16_library()
        kernel = None if lib_bf16 is None else lib_bf16.lora_add_runs_bf16
    if kernel is None:
        raise RuntimeError(f"the native {dtype} LoRA kernel is not available on this machine (select_op checks this)")
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:  # e.g. a transposed or broadcast x
        x = x.contiguous()
    if y.stride(1) != 1:
        raise ValueError("the native LoRA op writes y in place and needs contiguous rows")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows and x {x.shape[0]}")
    a, b, scales = a.contiguous(), b.contiguous(), scales.contiguous()  # no-ops for the layer's buffers
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or (a.shape[1], b.shape[1]) != (x.shape[1], y.shape[1]):
        raise ValueError(f"pools a {tuple(a.shape)} and b {tuple(b.shape)} do not fit x and y")
    if scales.shape[0] != slot_table.shape[0] or slot_table.shape[1:] != (2,) or slot_table.dtype != torch.int32:
        raise ValueError("scales and the [S+1, 2] int32 slot table must have one entry per slot")
    status = kernel(
        y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], y.shape[1],
        a.data_ptr(), b.data_ptr(), slot_table.shape[0], a.shape[0], slot_table.data_ptr(), scales.data_ptr(),
        run_table.data_ptr(), run_table.shape[0], torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise ValueError("native LoRA op: a slot, run, rank, pool row or shape is out of range (nothing was added)")


@functools.cache
def native_usable(dtype: torch.dtype = torch.float32) -> bool:
    """The kernel of ``dtype`` builds here and equals the reference op on a small case covering its edge paths
    (bfloat16: the reference computed in float32 from the same bfloat16 values, within bfloat16's rounding)."""
    if dtype not in NATIVE_DTYPES:
        return False
    if (shared_library() if dtype == torch.float32 else shared_bf16_library()) is None:
        return False
    from server.kernels.reference import ReferenceOp

    g = torch.Generator().manual_seed(0)
    ranks = [0, 8, 3, 5, 0]  # rank 0 = an empty slot; ranks 3 and 5 leave rank blocks of 4 partly filled
    offsets = [0, 9, 1, 4, 0]  # out of slot order, rows 0 and 17.. left free
    pool_rows, d_in, d_out = 20, 37, 45  # neither width a multiple of the vector length
    a, b = torch.zeros(pool_rows + 1, d_in), torch.zeros(pool_rows + 1, d_out)
    for offset, r in zip(offsets, ranks, strict=True):
        a[offset : offset + r] = torch.randn(r, d_in, generator=g)
        b[offset : offset + r] = torch.randn(r, d_out, generator=g)
    a[17:20], b[17:20] = float("nan"), float("nan")  # rows no slot holds are never read
    scales = torch.tensor([0.0, 2.0, 0.5, 1.0, 0.0])
    slots = [1] * 9 + [0] * 2 + [2] + [3] * 6 + [4] * 2 + [1] * 3  # runs of 9, 1, 6 and 3 rows, base tokens
    mapping = TokenSlotMapping.build(slots)
    x = torch.randn(len(slots), d_in + 3, generator=g)  # its first d_in columns: strided rows
    y0 = torch.randn(len(slots), d_out, generator=g)
    # The reference runs in float32 on the very values the kernel reads (for bfloat16, those values rounded).
    a, b, scales, x, y0 = (t.to(dtype).float() for t in (a, b, scales, x, y0))
    expected = y0.clone()
    reference = ReferenceOp()
    reference.add(expected, x[:, :d_in], LoraWeights.build(a, b, scales, ranks, offsets), reference.prepare(mapping))
    a, b, scales, x, got = (t.to(dtype) for t in (a, b, scales, x, y0.clone()))
    try:
        op = NativeOp()
        op.add(got, x[:, :d_in], LoraWeights.build(a, b, scales, ranks, offsets), op.prepare(mapping))
    except (RuntimeError, ValueError, TypeError) as exc:
        log.warning("native %s LoRA kernel failed its self-check, using the torch op: %s", dtype, exc)
        return False
    # float32: sums in another order; bfloat16: y rounded once to nearest even (half a unit in the 8th bit)
    rtol = 1e-4 if dtype == torch.float32 else 2.0**-8
    if not torch.allclose(got.float(), expected, atol=1e-4, rtol=rtol):
        error = (got.float() - expected).abs().max().item()
        log.warning("native %s LoRA kernel disagrees with the reference (max error %.3g), using the torch op", dtype,
                    error)  # fmt: skip
        return False
    return True
