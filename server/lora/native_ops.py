"""``lora_add_native``: the batched LoRA add on CPU by the C kernel, all runs of one layer in one call (float32).

Same semantics as ``ops.lora_add_reference``. The torch op pays two matmul dispatches per run and layer, each a
tiny GEMM whose cost is mostly overhead; this op hands the step's run table to ``native/lora_runs.c`` once per
layer. It is chosen by ``select_op`` when the kernel builds and passes ``native_usable``'s check against the
reference on this machine; otherwise the torch op serves.
"""

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from server.lora.mapping import TokenSlotMapping
from server.lora.native_build import shared_library

if TYPE_CHECKING:
    from server.lora.ops import SlotViews

log = logging.getLogger(__name__)


def lora_add_native(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    ranks: Sequence[int],
    mapping: TokenSlotMapping,
    views: "SlotViews | None" = None,
) -> None:
    """y[t] += scales[s_t] * (x[t] @ a[s_t, :r].T) @ b[s_t, :r] for every adapter token t, r = ranks[s_t], in place.

    y: [T, out]  x: [T, in]  a: [S+1, R, in]  b: [S+1, R, out]  scales: [S+1], all float32 on the CPU.
    The runs come from ``mapping.run_table`` ([n, 3] int32: slot, start, end), the ranks from ``views.rank_table``
    when given (the layer keeps it current), else from ``ranks``. Rows of y and x may be strided; columns not.
    """
    table = mapping.run_table
    if table is None or table.shape[0] == 0:
        return
    lib = shared_library()
    if lib is None:
        raise RuntimeError("the native LoRA kernel is not available on this machine (select_op checks this)")
    if not (x.dtype == y.dtype == a.dtype == b.dtype == scales.dtype == torch.float32):
        raise TypeError("the native LoRA op takes float32 tensors only")
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:  # e.g. a transposed or broadcast x
        x = x.contiguous()
    if y.stride(1) != 1:
        raise ValueError("the native LoRA op writes y in place and needs contiguous rows")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows and x {x.shape[0]}")
    a, b, scales = a.contiguous(), b.contiguous(), scales.contiguous()  # no-ops for the layer's buffers
    rank_table = views.rank_table if views is not None else torch.tensor(list(ranks), dtype=torch.int32)
    if not a.shape[0] == b.shape[0] == scales.shape[0] == rank_table.shape[0]:
        raise ValueError("a, b, scales and ranks must have one entry per slot")
    status = lib.lora_add_runs_f32(
        y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], y.shape[1],
        a.data_ptr(), b.data_ptr(), a.shape[0], a.shape[1], rank_table.data_ptr(), scales.data_ptr(),
        table.data_ptr(), table.shape[0], torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise ValueError("native LoRA op: a slot, run, rank or shape is out of range (nothing was added)")


@functools.cache
def native_usable() -> bool:
    """The kernel builds here and equals the reference op on a small case covering its edge paths."""
    if shared_library() is None:
        return False
    from server.lora.ops import lora_add_reference

    g = torch.Generator().manual_seed(0)
    ranks = [0, 8, 3, 5, 0]  # rank 0 = an empty slot; ranks 3 and 5 leave rank blocks of 4 partly filled
    num, max_rank, d_in, d_out = len(ranks), 8, 37, 45  # neither width a multiple of the vector length
    a, b = torch.zeros(num, max_rank, d_in), torch.zeros(num, max_rank, d_out)
    for slot, r in enumerate(ranks):
        a[slot, :r] = torch.randn(r, d_in, generator=g)
        b[slot, :r] = torch.randn(r, d_out, generator=g)
    scales = torch.tensor([0.0, 2.0, 0.5, 1.0, 0.0])
    slots = [1] * 9 + [0] * 2 + [2] + [3] * 6 + [4] * 2 + [1] * 3  # runs of 9, 1, 6 and 3 rows, base tokens
    mapping = TokenSlotMapping.build(slots, allow_short=False)
    x = torch.randn(len(slots), d_in + 3, generator=g)[:, :d_in]  # strided rows
    y0 = torch.randn(len(slots), d_out, generator=g)
    expected, got = y0.clone(), y0.clone()
    lora_add_reference(expected, x, a, b, scales, ranks, mapping)
    try:
        lora_add_native(got, x, a, b, scales, ranks, mapping)
    except (RuntimeError, ValueError) as exc:
        log.warning("native LoRA kernel failed its self-check, using the torch op: %s", exc)
        return False
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        error = (got - expected).abs().max().item()
        log.warning("native LoRA kernel disagrees with the reference (max error %.3g), using the torch op", error)
        return False
    return True
