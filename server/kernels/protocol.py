"""What every LoRA op shares: the semantics, the weight layouts and the two-call protocol (the punica-wrapper
pattern of vLLM).

Every op computes, in place,
    y[t] += scales[s] * (x[t] @ a[o:o+r].T) @ b[o:o+r]    s = slot of token t, o = offsets[s], r = ranks[s]
for every token not on BASE_SLOT, in two calls:
    meta = op.prepare(mapping)          once per step, only by the active op: its own per-step metadata
    op.add(y, x, weights, meta)         once per wrapped layer
Layouts of ``LoraWeights`` (per wrapped linear layer, ``S`` adapter slots plus ``BASE_SLOT`` 0, a pool of ``N``
rank rows shared by all slots, each adapter at its own rank):
    a:       [N+1, in]   pool of A rows; slot s's are a[offsets[s] : offsets[s] + ranks[s]]
    b:       [N+1, out]  pool of B rows (PEFT's lora_B.weight transposed, so a slot's rows are contiguous)
             row N (``zero_row``) is always zero: ops that pad a slot's rows to a common rank point the padding there
    scales:  [S+1]       scale of each slot for this layer, 0 for BASE_SLOT and empty slots
    offsets: list[int]   host-side first pool row of each slot (the same in every layer of a model)
    ranks:   list[int]   host-side rank of each slot for this layer, 0 where the slot has nothing for it
Pool rows outside every slot's ``offsets[s] : offsets[s] + ranks[s]`` hold anything (freed or reserved rows): no op
reads them.
"""

from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch

from server.kernels.mapping import TokenSlotMapping

Meta = TypeVar("Meta")


class LoraWeights:
    """One wrapped layer's LoRA weights for all slots, as every op reads them (one object, not seven args).

    The layer owns ``a``, ``b`` and ``scales`` (its buffers) and calls ``set`` after writing, moving or clearing a
    slot, so the host-side views stay current: ``of[slot]`` is ``(a[o:o+r].T, b[o:o+r], scale)`` with ``scale`` a
    float, or None for an empty slot. Taking the views once per slot load instead of once per run and step saves
    five view dispatches and a scale multiply per run. ``slot_table`` ([S+1, 2] int32, host) is ``(offsets[s],
    ranks[s])`` for the C kernel; ``version`` counts ``set`` calls, so ops may cache what they derive from the
    tables (device copies, gather indices) until it changes.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor) -> None:
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or a.shape[0] < 2:
            raise ValueError(f"pools a {tuple(a.shape)} and b {tuple(b.shape)} must be [N+1, in] and [N+1, out]")
        entries = scales.shape[0]
        self.a, self.b, self.scales = a, b, scales
        self.offsets: list[int] = [0] * entries
        self.ranks: list[int] = [0] * entries
        self.slot_table = torch.zeros(entries, 2, dtype=torch.int32)
        self.of: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None] * entries
        self.version = 0

    @property
    def pool_rows(self) -> int:
        """N: the rows slots may use (the last row of ``a``/``b``, ``zero_row``, is not one of them)."""
        return self.a.shape[0] - 1

    @property
    def zero_row(self) -> int:
        return self.a.shape[0] - 1

    def set(self, slot: int, offset: int, rank: int, scale: float) -> None:
        """Record that pool rows ``offset .. offset + rank - 1`` hold ``slot``'s weights (rank 0: the slot is empty
        in this layer)."""
        if rank and not (0 <= offset and offset + rank <= self.pool_rows):
            raise ValueError(f"rows {offset}..{offset + rank - 1} are outside the pool of {self.pool_rows} rows")
        offset = offset if rank else 0
        self.offsets[slot], self.ranks[slot] = offset, rank
        self.slot_table[slot, 0], self.slot_table[slot, 1] = offset, rank
        view = (self.a[offset : offset + rank].T, self.b[offset : offset + rank], float(scale))
        self.of[slot] = view if rank else None
        self.version += 1

    @classmethod
    def build(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        scales: torch.Tensor,
        ranks: Sequence[int],
        offsets: Sequence[int] | None = None,
    ) -> "LoraWeights":
        """Weights already written into the pools ``a``/``b`` ([N+1, in], [N+1, out], row N zero) and ``scales``,
        slot ``s`` at rows ``offsets[s] : offsets[s] + ranks[s]``.

        Stacked per-slot weights ``a`` [S+1, R, in], ``b`` [S+1, R, out] (the layout before the pool; benchmarks
        build them) are copied into a pool with slot ``s`` at offset ``s * R`` (``offsets`` must be None).
        """
        if a.dim() == 3:
            if offsets is not None:
                raise ValueError("stacked weights get offsets s * R; pass pools to choose offsets")
            offsets = [s * a.shape[1] for s in range(a.shape[0])]
            a = torch.cat([a.reshape(-1, a.shape[2]), a.new_zeros(1, a.shape[2])])
            b = torch.cat([b.reshape(-1, b.shape[2]), b.new_zeros(1, b.shape[2])])
        if offsets is None:
            raise ValueError("pooled weights need each slot's offset")
        weights = cls(a, b, scales)
        for slot, (offset, rank) in enumerate(zip(offsets, ranks, strict=True)):
            weights.set(slot, offset, rank, float(scales[slot]))
        return weights


class LoraOp(Protocol[Meta]):
    """A LoRA backend: builds its own per-step metadata once, then adds every layer's LoRA term with it."""

    def prepare(self, mapping: TokenSlotMapping) -> Meta:
        """This op's metadata for one step (host work and small uploads), shared by every layer of the step."""
        ...

    def add(self, y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, meta: Meta) -> None:
        """y[t] += scales[s] * (x[t] @ a[o:o+r].T) @ b[o:o+r] in place (o, r: slot s's offset and rank).
        y: [T, out]  x: [T, in]."""
        ...
