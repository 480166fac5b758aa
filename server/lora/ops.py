"""The batched LoRA add, ``y[t] += scale[s] * (x[t] @ A[s].T) @ B[s]`` with ``s = slot of token t``.

Implementations with identical semantics; one is chosen once at startup (``select_op``):

- ``lora_add_reference``: gathers every token's weights and multiplies them. Obviously right, slow and memory-hungry
  (``T x R x in`` floats); it is the yardstick every fast op is tested against.
- ``lora_add_grouped``: tokens are grouped by slot once per step (``TokenSlotMapping``), gathered into slot order,
  and each slot's segment gets two small dense matmuls sliced to that slot's true rank. This is the SGMV layout of
  Punica/LoRAX written with torch matmuls, which is what wins on CPU. When a step has many small groups (decode
  with many adapters) the mapping instead lays tokens out as a [slots, rows] grid and the add is two ``bmm`` calls
  over the window of slots in use, so the cost no longer grows with one dispatch per adapter.
- ``triton`` (``server.lora.triton_ops``, registered when triton is installed): Triton kernels, a segmented SGMV
  pair for prefill and a gathered per-token BGMV pair for decode, picked per step; ``triton_sgmv`` and
  ``triton_bgmv`` force one pair. ``auto`` takes it on CUDA when triton imports, else ``grouped``.

Layouts (per wrapped linear layer, ``S`` adapter slots plus ``BASE_SLOT`` 0, max rank ``R``):
    A:      [S+1, R, in]   rows past an adapter's rank are zero
    B:      [S+1, R, out]  (PEFT's lora_B.weight transposed, so B[s, :r] is contiguous)
    scales: [S+1]          scale of each slot for this layer, 0 for BASE_SLOT and empty slots
    ranks:  list[int]      host-side rank of each slot for this layer, 0 where the slot has nothing for it
"""

from collections.abc import Sequence
from typing import Protocol

import torch

from server.lora import triton_ops
from server.lora.mapping import PaddedSlots, TokenSlotMapping


class LoraAddOp(Protocol):
    def __call__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scales: torch.Tensor,
        ranks: Sequence[int],
        mapping: TokenSlotMapping,
    ) -> None: ...


def lora_add_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    ranks: Sequence[int],
    mapping: TokenSlotMapping,
) -> None:
    """y[t] += scales[s_t] * (x[t] @ a[s_t].T) @ b[s_t] for every token t, in place.

    y: [T, out]  x: [T, in]  a: [S+1, R, in]  b: [S+1, R, out]  scales: [S+1]  mapping.token_slots: [T] int64.
    Uses the full padded rank R (zero rows contribute nothing), so stale data past a rank would show up here.
    """
    slots = mapping.token_slots  # [T]
    xa = torch.einsum("ti,tri->tr", x, a[slots])  # [T, R]
    xa = xa * scales[slots].unsqueeze(1)
    y += torch.einsum("tr,tro->to", xa, b[slots]).to(y.dtype)


def lora_add_grouped(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    ranks: Sequence[int],
    mapping: TokenSlotMapping,
) -> None:
    """Same semantics as ``lora_add_reference``, computed per slot segment at each slot's true rank.

    Tokens of BASE_SLOT are skipped. ``mapping.segments`` lists (slot, start, end) host-side ints, so no device
    sync happens here: ranges of ``x`` itself when every slot's tokens form one run, else ranges of
    ``x[mapping.order]`` (adapter tokens sorted by slot), gathered once and scattered back once.
    """
    if not mapping.segments:
        return
    if mapping.padded is not None:
        _lora_add_padded(y, x, a, b, scales, ranks, mapping.padded)
        return
    if not mapping.gathered:  # each slot's tokens are already one run of x: add in place, no gather or scatter
        for slot, start, end in mapping.segments:
            if r := ranks[slot]:
                xa = (x[start:end] @ a[slot, :r].T).mul_(scales[slot])  # [n, r]
                y[start:end].addmm_(xa, b[slot, :r])  # [n, out]
        return
    xs = x.index_select(0, mapping.order)  # [N, in] adapter tokens in slot order
    out = torch.empty((xs.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)  # [N, out]; segments cover it
    for slot, start, end in mapping.segments:
        if r := ranks[slot]:
            xa = (xs[start:end] @ a[slot, :r].T).mul_(scales[slot])
            torch.mm(xa, b[slot, :r], out=out[start:end])
        else:
            out[start:end].zero_()
    y.index_add_(0, mapping.order, out)


def _lora_add_padded(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    ranks: Sequence[int],
    padded: PaddedSlots,
) -> None:
    """The same add over a [W slots, M rows] grid of adapter tokens: two bmm calls for the whole window.

    When the adapter tokens already are the grid (``padded.run``: one token per slot, in slot order) the grid is a
    view of ``x`` and the result is added to a slice of ``y``; otherwise one gather builds it and one scatter-add
    puts the real cells back.
    """
    lo, hi = padded.lo, padded.hi
    r = max(ranks[lo:hi])
    if r == 0:
        return
    if padded.run is not None:
        start, end = padded.run
        grid = x[start:end].unsqueeze(1)  # [W, 1, in]
    else:
        grid = x.index_select(0, padded.gather).view(hi - lo, padded.rows, x.shape[1])  # [W, M, in]
    xa = torch.bmm(grid, a[lo:hi, :r].transpose(1, 2))  # [W, M, r]; rows past a slot's rank are zero
    xa.mul_(scales[lo:hi].view(-1, 1, 1))
    out = torch.bmm(xa, b[lo:hi, :r]).view(-1, y.shape[1])  # [W*M, out]
    if padded.run is not None:
        y[start:end] += out.to(y.dtype)
    else:
        y.index_add_(0, padded.tokens, out.index_select(0, padded.cells))


LORA_OPS: dict[str, LoraAddOp] = {
    "reference": lora_add_reference,
    "grouped": lora_add_grouped,
}
if triton_ops.TRITON_AVAILABLE:  # triton itself is imported on the op's first use, not here
    LORA_OPS.update(triton_ops.OPS)


def select_op(name: str, device: torch.device) -> LoraAddOp:
    """The LoRA op to use, chosen once at startup. ``auto`` picks the fastest correct op for the device."""
    if name == "auto":
        # Triton kernels on CUDA; on CPU the grouped torch op (Triton has no CPU backend, only a slow interpreter).
        name = "triton" if device.type == "cuda" and "triton" in LORA_OPS and triton_ops.triton_usable() else "grouped"
    try:
        return LORA_OPS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA op {name!r}; choose one of {sorted(LORA_OPS)} or 'auto'") from None
