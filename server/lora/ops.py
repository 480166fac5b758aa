"""The batched LoRA add, ``y[t] += scale[s] * (x[t] @ A[s].T) @ B[s]`` with ``s = slot of token t``.

Implementations with identical semantics; one is chosen once at startup (``select_op``):

- ``lora_add_reference``: gathers every token's weights and multiplies them. Obviously right, slow and memory-hungry
  (``T x R x in`` floats); it is the yardstick every fast op is tested against.
- ``lora_add_grouped``: the tokens of one adapter that sit next to each other (a prompt chunk, or one adapter's
  decode tokens; the runner sorts tokens by slot) form a run, and each run gets two small dense matmuls at its
  slot's true rank through the layer's per-slot views: the SGMV layout of Punica/LoRAX written with torch matmuls.
  Short runs cost one dispatch pair per adapter that way, so when a step has many of them (``MIN_SHORT_RUNS``) they
  go on a [slots, rows] grid, the used slots' weights are copied once and two ``bmm`` calls do the add: a fixed
  number of calls however many adapters the step mixes.
- ``native`` (``server.lora.native_ops``, CPU float32): a C kernel that does every run of a layer in one call;
  ``auto`` takes it on CPU when it builds here and passes its self-check, else ``grouped``.
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

from server.lora import native_ops, triton_ops
from server.lora.mapping import ShortRuns, TokenSlotMapping


class SlotViews:
    """Host-side per-slot views of one layer's stacked weights, kept by the layer as adapters come and go.

    ``of[slot]`` is ``(a[slot, :r].T, b[slot, :r], scale)`` with ``scale`` a float, or None for an empty slot.
    Taking the views once per slot load instead of once per run and step saves five view dispatches and a
    scale multiply per run (the scale rides on ``addmm``'s ``alpha``). ``rank_table`` ([S+1] int32, host) is the
    same ranks for the native kernel.
    """

    def __init__(self, num_entries: int) -> None:
        self.of: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None] * num_entries
        self.rank_table = torch.zeros(num_entries, dtype=torch.int32)

    def set(self, slot: int, a: torch.Tensor, b: torch.Tensor, rank: int, scale: float) -> None:
        """a: [S+1, R, in]  b: [S+1, R, out], already holding the slot's weights in rows ``:rank``."""
        self.of[slot] = (a[slot, :rank].T, b[slot, :rank], float(scale)) if rank else None
        self.rank_table[slot] = rank

    @classmethod
    def build(cls, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, ranks: Sequence[int]) -> "SlotViews":
        views = cls(len(ranks))
        for slot, rank in enumerate(ranks):
            views.set(slot, a, b, rank, float(scales[slot]))
        return views


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
        views: SlotViews | None = None,
    ) -> None: ...


def lora_add_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    ranks: Sequence[int],
    mapping: TokenSlotMapping,
    views: SlotViews | None = None,
) -> None:
    """y[t] += scales[s_t] * (x[t] @ a[s_t].T) @ b[s_t] for every token t, in place (``views`` unused).

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
    views: SlotViews | None = None,
) -> None:
    """Same semantics as ``lora_add_reference``: long runs by two dense matmuls each, short runs on a slot grid.

    Tokens of BASE_SLOT are skipped. ``mapping.runs`` lists (slot, start, end) host-side ints, so no device sync
    happens here; each run is computed at its slot's true rank, in place on slices of ``x`` and ``y``, through
    the layer's ``views`` when given (else views are taken here).
    """
    if mapping.runs:
        of = (views if views is not None else SlotViews.build(a, b, scales, ranks)).of
        for slot, start, end in mapping.runs:
            if (view := of[slot]) is not None:
                a_t, b_r, scale = view  # [in, r], [r, out]
                y[start:end].addmm_(x[start:end] @ a_t, b_r, alpha=scale)  # [n, out]
    if mapping.short is not None:
        _lora_add_short(y, x, a, b, scales, ranks, mapping.short)


def _lora_add_short(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    ranks: Sequence[int],
    short: ShortRuns,
) -> None:
    """The same add for the short-run tokens, over a [D slots, M rows] grid with two ``bmm`` calls.

    Copies the D slots' A and B (``[D, r, in]``, ``[D, r, out]``, r = the largest rank present: the bytes the
    per-slot matmuls would read anyway) so the call count does not grow with the number of adapters.
    """
    r = max(ranks[slot] for slot in short.distinct)
    if r == 0:
        return
    d, m = len(short.distinct), short.rows
    if short.span is not None:
        start, end = short.span
        grid = x[start:end].view(d, 1, -1)  # [D, 1, in]
    else:
        grid = x.index_select(0, short.gather).view(d, m, -1)  # [D, M, in]
    a_used = a[:, :r].index_select(0, short.slots)  # [D, r, in]
    b_used = b[:, :r].index_select(0, short.slots)  # [D, r, out]
    xa = torch.bmm(grid, a_used.transpose(1, 2))  # [D, M, r]
    xa.mul_(scales.index_select(0, short.slots).view(d, 1, 1))
    out = torch.bmm(xa, b_used).view(d * m, -1)  # [D*M, out]
    if short.span is not None:
        y[start:end] += out.to(y.dtype)
    else:
        y.index_add_(0, short.tokens, out.index_select(0, short.cells).to(y.dtype))


LORA_OPS: dict[str, LoraAddOp] = {
    "reference": lora_add_reference,
    "grouped": lora_add_grouped,
    "native": native_ops.lora_add_native,
}
if triton_ops.TRITON_AVAILABLE:  # triton itself is imported on the op's first use, not here
    LORA_OPS.update(triton_ops.OPS)


def select_op(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LoraAddOp:
    """The LoRA op to use, chosen once at startup. ``auto`` picks the fastest correct op for the device."""
    native_fits = device.type == "cpu" and dtype == torch.float32
    if name == "auto":
        # Triton kernels on CUDA (Triton has no CPU backend, only a slow interpreter); on CPU the C kernel for
        # float32 where it builds, else the grouped torch op.
        if device.type == "cuda":
            name = "triton" if "triton" in LORA_OPS and triton_ops.triton_usable() else "grouped"
        else:
            name = "native" if native_fits and native_ops.native_usable() else "grouped"
    elif name == "native" and not (native_fits and native_ops.native_usable()):
        raise ValueError("the native LoRA op needs float32 on the CPU and a working C compiler (see the log)")
    elif name.startswith("triton") and device.type != "cuda" and not triton_ops.interpreting():
        raise ValueError(f"the {name} LoRA op needs a CUDA device")
    try:
        return LORA_OPS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA op {name!r}; choose one of {sorted(LORA_OPS)} or 'auto'") from None
