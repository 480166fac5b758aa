"""``BatchedLoraLinear``: a frozen ``nn.Linear`` plus stacked LoRA weights for all slots, applied unmerged per token."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from server.kernels.protocol import LoraOp, LoraWeights
from server.kernels.slots import BASE_SLOT
from server.lora.context import LoraContext


class BatchedLoraLinear(nn.Module):
    """``y = base(x) + scale[s] * (x @ A[s].T) @ B[s]`` where ``s`` is each token's slot from the shared context.

    Buffers are preallocated at the maximum rank for all slots (``num_slots + 1`` entries, entry BASE_SLOT stays
    zero) so loading an adapter is a copy into a slice, never an allocation:
        lora_a: [S+1, R, in]    lora_b: [S+1, R, out]    scales: [S+1]
    ``weights`` hands them to the op as one object, with each slot's true rank for this layer (host ints) so the
    fast ops skip the zero padding, and per-slot views.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self, base: nn.Linear, num_slots: int, max_rank: int, context: LoraContext, op: LoraOp[Any]
    ) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.op = op
        dtype, device = base.weight.dtype, base.weight.device
        entries = num_slots + 1
        self.register_buffer("lora_a", torch.zeros(entries, max_rank, base.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(entries, max_rank, base.out_features, dtype=dtype, device=device))
        self.register_buffer("scales", torch.zeros(entries, dtype=dtype, device=device))
        self.weights = LoraWeights(self.lora_a, self.lora_b, self.scales)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]; the mapping covers the flattened leading dimensions.
        y = self.base(x)
        step = self.context.step
        if step is None:
            return y
        x2 = x.reshape(-1, self.base.in_features)
        y2 = y.view(-1, self.base.out_features)
        if x2.shape[0] != step.num_tokens:
            raise RuntimeError(f"LoRA mapping covers {step.num_tokens} tokens but the layer got {x2.shape[0]}")
        self.op.add(y2, x2, self.weights, step.meta)
        return y

    @torch.no_grad()
    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Load one adapter's weights for this layer into ``slot``; the rest of the slot is zeroed.

        a: [r, in] (PEFT lora_A.weight)    b: [out, r] (PEFT lora_B.weight)    r <= max rank
        Invariant kept by every write and clear: rows at or past ``ranks[slot]`` are zero, so only the rows the
        previous occupant used beyond the new rank need zeroing (a full-slot zero costs more than the copy).
        """
        self._check_slot(slot)
        r, previous = a.shape[0], self.weights.ranks[slot]
        if previous > r:
            self.lora_a[slot, r:previous].zero_()
            self.lora_b[slot, r:previous].zero_()
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_b[slot, :r].copy_(b.T, non_blocking=True)
        self.scales[slot] = scale
        self.weights.set(slot, r, scale)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        previous = self.weights.ranks[slot]
        if previous == 0:
            return  # already empty (rows past rank 0 are zero, and so is the scale)
        self.lora_a[slot, :previous].zero_()
        self.lora_b[slot, :previous].zero_()
        self.scales[slot] = 0.0
        self.weights.set(slot, 0, 0.0)

    def _check_slot(self, slot: int) -> None:
        if not BASE_SLOT < slot < self.scales.shape[0]:
            raise ValueError(f"slot {slot} is not an adapter slot (1..{self.scales.shape[0] - 1})")

    def extra_repr(self) -> str:
        slots: Sequence[int] = range(1, len(self.weights.ranks))
        return f"slots={len(slots)}, max_rank={self.lora_a.shape[1]}"
