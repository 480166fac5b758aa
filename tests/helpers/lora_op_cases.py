"""One factory of LoRA-op cases for every op test: stacked weights of mixed ranks, inputs and token slots."""

import random
from dataclasses import dataclass
from typing import Any

import torch

from server.kernels.mapping import TokenSlotMapping
from server.kernels.protocol import LoraOp, LoraWeights
from server.kernels.reference import ReferenceOp


@dataclass
class OpCase:
    """weights: a [S+1, R, in], b [S+1, R, out], scales [S+1] (slot 0 and rank-0 slots all zero); x: [T, in];
    y0: [T, out]; slots: the slot of each of the T tokens."""

    weights: LoraWeights
    x: torch.Tensor
    y0: torch.Tensor
    slots: list[int]

    def untouched_rows(self) -> list[int]:
        """Tokens with nothing to add (base slot, or an adapter without weights for this layer)."""
        return [t for t, s in enumerate(self.slots) if self.weights.ranks[s] == 0]


def random_weights(
    num_slots: int, max_rank: int, d_in: int, d_out: int, ranks: list[int], seed: int, device: str = "cpu"
) -> LoraWeights:
    """Slot s holds random rank-``ranks[s]`` weights (rows past it zero) and a scale in 0.25..4; slot 0 is zero."""
    g = torch.Generator(device).manual_seed(seed)
    rng = random.Random(seed)
    a = torch.zeros(num_slots + 1, max_rank, d_in, device=device)
    b = torch.zeros(num_slots + 1, max_rank, d_out, device=device)
    scales = torch.zeros(num_slots + 1, device=device)
    for s in range(1, num_slots + 1):
        r = ranks[s]
        a[s, :r] = torch.randn(r, d_in, generator=g, device=device)
        b[s, :r] = torch.randn(r, d_out, generator=g, device=device)
        scales[s] = rng.uniform(0.25, 4.0) if r else 0.0
    return LoraWeights.build(a, b, scales, ranks)


def make_case(seed: int, d_in: int = 24, d_out: int = 40, max_rank: int = 16, tokens: int | None = None,
              sorted_slots: bool = False, strided_x: bool = False) -> OpCase:  # fmt: skip
    """A random step over 6 adapter slots (ranks 0..max_rank) and base tokens."""
    rng = random.Random(seed)
    num_slots = 6
    ranks = [0] + [min(max_rank, rng.choice([0, 1, 3, 4, 7, 8, max_rank])) for _ in range(num_slots)]
    weights = random_weights(num_slots, max_rank, d_in, d_out, ranks, seed)
    tokens = tokens if tokens is not None else rng.randint(1, 60)
    slots = [rng.randrange(num_slots + 1) for _ in range(tokens)]
    if sorted_slots:
        slots.sort()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d_in + 5, generator=g)[:, :d_in] if strided_x else torch.randn(tokens, d_in, generator=g)
    y0 = torch.randn(tokens, d_out, generator=g)
    return OpCase(weights, x, y0, slots)


def apply_op(op: LoraOp[Any], y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, slots: list[int]) -> None:
    """One step of ``op`` on one layer: prepare from the token slots, then add in place."""
    op.add(y, x, weights, op.prepare(TokenSlotMapping.build(slots, x.device)))


def reference_result(case: OpCase) -> torch.Tensor:
    """y0 plus the LoRA term, by the reference op."""
    expected = case.y0.clone()
    apply_op(ReferenceOp(), expected, case.x, case.weights, case.slots)
    return expected
