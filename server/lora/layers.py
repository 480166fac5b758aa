"""``BatchedLoraLinear``: a frozen ``nn.Linear`` plus stacked LoRA weights for all slots, applied unmerged per token."""

from collections.abc import Sequence

import torch
from torch import nn

from server.lora.mapping import LoraContext
from server.lora.ops import LoraAddOp, SlotViews
from server.lora.slots import BASE_SLOT


class BatchedLoraLinear(nn.Module):
    """``y = base(x) + scale[s] * (x @ A[s].T) @ B[s]`` where ``s`` is each token's slot from the shared context.

    Buffers are preallocated at the maximum rank for all slots (``num_slots + 1`` entries, entry BASE_SLOT stays
    zero) so loading an adapter is a copy into a slice, never an allocation:
        lora_a: [S+1, R, in]    lora_b: [S+1, R, out]    scales: [S+1]
    ``ranks`` (host ints) holds each slot's true rank for this layer so the fast op skips the zero padding.
    """

    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, context: LoraContext, op: LoraAddOp) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.op = op
        weight = base.weight
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer("lora_a", torch.zeros(num_slots + 1, max_rank, base.in_features, **factory))
        self.register_buffer("lora_b", torch.zeros(num_slots + 1, max_rank, base.out_features, **factory))
        self.register_buffer("scales", torch.zeros(num_slots + 1, **factory))
        self.ranks: list[int] = [0] * (num_slots + 1)
        self.views = SlotViews(num_slots + 1)  # host-side views per slot, for the grouped op

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]; the mapping covers the flattened leading dimensions.
        y = self.base(x)
        mapping = self.context.mapping
        if mapping is None or not mapping.segments:
            return y
        x2 = x.reshape(-1, self.base.in_features)
        y2 = y.view(-1, self.base.out_features)
        if x2.shape[0] != mapping.num_tokens:
            raise RuntimeError(f"LoRA mapping covers {mapping.num_tokens} tokens but the layer got {x2.shape[0]}")
        self.op(y2, x2, self.lora_a, self.lora_b, self.scales, self.ranks, mapping, self.views)
        return y

    @torch.no_grad()
    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Load one adapter's weights for this layer into ``slot``; the rest of the slot is zeroed.

        a: [r, in] (PEFT lora_A.weight)    b: [out, r] (PEFT lora_B.weight)    r <= max rank
        Invariant kept by every write and clear: rows at or past ``ranks[slot]`` are zero, so only the rows the
        previous occupant used beyond the new rank need zeroing (a full-slot zero costs more than the copy).
        """
        self._check_slot(slot)
        r, previous = a.shape[0], self.ranks[slot]
        if previous > r:
            self.lora_a[slot, r:previous].zero_()
            self.lora_b[slot, r:previous].zero_()
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_b[slot, :r].copy_(b.T, non_blocking=True)
        self.scales[slot] = scale
        self.ranks[slot] = r
        self.views.set(slot, self.lora_a, self.lora_b, r, scale)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        previous = self.ranks[slot]
        if previous == 0:
            return  # already empty (rows past rank 0 are zero, and so is the scale)
        self.lora_a[slot, :previous].zero_()
        self.lora_b[slot, :previous].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 0
        self.views.set(slot, self.lora_a, self.lora_b, 0, 0.0)

    def _check_slot(self, slot: int) -> None:
        if not BASE_SLOT < slot < self.scales.shape[0]:
            raise ValueError(f"slot {slot} is not an adapter slot (1..{self.scales.shape[0] - 1})")

    def extra_repr(self) -> str:
        slots: Sequence[int] = range(1, len(self.ranks))
        return f"slots={len(slots)}, max_rank={self.lora_a.shape[1]}"
