"""What every LoRA op shares: the semantics, the weight layouts and the two-call protocol (the punica-wrapper
pattern of vLLM).

Every op computes, in place,
    y[t] += scales[s] * (x[t] @ a[s, :r].T) @ b[s, :r]    s = slot of token t, r = ranks[s]
for every token not on BASE_SLOT, in two calls:
    meta = op.prepare(mapping)          once per step, only by the active op: its own per-step metadata
    op.add(y, x, weights, meta)         once per wrapped layer
Layouts of ``LoraWeights`` (per wrapped linear layer, ``S`` adapter slots plus ``BASE_SLOT`` 0, max rank ``R``):
    a:      [S+1, R, in]   rows past a slot's rank are zero
    b:      [S+1, R, out]  (PEFT's lora_B.weight transposed, so b[s, :r] is contiguous)
    scales: [S+1]          scale of each slot for this layer, 0 for BASE_SLOT and empty slots
    ranks:  list[int]      host-side rank of each slot for this layer, 0 where the slot has nothing for it
"""

from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch

from server.kernels.mapping import TokenSlotMapping

Meta = TypeVar("Meta")


class LoraWeights:
    """One wrapped layer's stacked LoRA weights for all slots, as every op reads them (one object, not six args).

    The layer owns ``a``, ``b`` and ``scales`` (its buffers) and calls ``set`` after writing or clearing a slot, so
    the host-side views stay current: ``of[slot]`` is ``(a[slot, :r].T, b[slot, :r], scale)`` with ``scale`` a
    float, or None for an empty slot. Taking the views once per slot load instead of once per run and step saves
    five view dispatches and a scale multiply per run. ``rank_table`` ([S+1] int32, host) is ``ranks`` for the C
    kernel.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor) -> None:
        entries = a.shape[0]
        self.a, self.b, self.scales = a, b, scales
        self.ranks: list[int] = [0] * entries
        self.rank_table = torch.zeros(entries, dtype=torch.int32)
        self.of: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None] * entries

    def set(self, slot: int, rank: int, scale: float) -> None:
        """Record that ``a``/``b`` hold ``slot``'s weights in rows ``:rank`` (0: the slot is empty)."""
        self.ranks[slot] = rank
        self.rank_table[slot] = rank
        self.of[slot] = (self.a[slot, :rank].T, self.b[slot, :rank], float(scale)) if rank else None

    @classmethod
    def build(cls, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, ranks: Sequence[int]) -> "LoraWeights":
        """Weights already written into ``a``/``b``/``scales``, slot ``s`` at rank ``ranks[s]``."""
        weights = cls(a, b, scales)
        for slot, rank in enumerate(ranks):
            weights.set(slot, rank, float(scales[slot]))
        return weights


class LoraOp(Protocol[Meta]):
    """A LoRA backend: builds its own per-step metadata once, then adds every layer's LoRA term with it."""

    def prepare(self, mapping: TokenSlotMapping) -> Meta:
        """This op's metadata for one step (host work and small uploads), shared by every layer of the step."""
        ...

    def add(self, y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, meta: Meta) -> None:
        """y[t] += scales[s] * (x[t] @ a[s, :r].T) @ b[s, :r] in place.  y: [T, out]  x: [T, in]."""
        ...
