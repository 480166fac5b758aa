"""One factory of LoRA-op cases for every op test: adapter pools of mixed ranks, inputs and token slots."""

import random
from dataclasses import dataclass
from typing import Any

import torch

from server.kernels.mapping import TokenSlotMapping
from server.kernels.protocol import LoraOp, LoraWeights
from server.kernels.reference import ReferenceOp

MIXED_RANKS = [4, 8, 16, 32, 64]  # the true ranks one step mixes (tests/unit/test_ops.py)


@dataclass
class PoolTensors:
    """A layer's pool as plain tensors (so a test can convert dtypes and build ``LoraWeights`` from them).

    a: [N+1, in]  b: [N+1, out]  scales: [S+1]; slot s at rows offsets[s] .. + ranks[s]. Rows no slot uses (gaps,
    rows an adapter reserves beyond its rank in this layer) hold NaN: an op that reads them poisons its output.
    """

    a: torch.Tensor
    b: torch.Tensor
    scales: torch.Tensor
    ranks: list[int]
    offsets: list[int]

    def weights(self, dtype: torch.dtype | None = None) -> LoraWeights:
        a, b, scales = (t if dtype is None else t.to(dtype) for t in (self.a, self.b, self.scales))
        return LoraWeights.build(a, b, scales, self.ranks, self.offsets)


def random_pool(ranks: list[int], d_in: int, d_out: int, seed: int, device: str = "cpu",
                a_scale: float = 1.0, b_scale: float = 1.0) -> PoolTensors:  # fmt: skip
    """Slot s (ranks[0] is the base slot's, 0) holds random rank-``ranks[s]`` weights, a scale in 0.25..4 (0 when
    its rank is 0); slots sit in the pool out of slot order, with gaps and reserved rows between them (NaN)."""
    g = torch.Generator(device).manual_seed(seed)
    rng = random.Random(seed)
    order = list(range(1, len(ranks)))
    rng.shuffle(order)
    offsets = [0] * len(ranks)
    cursor = rng.randint(0, 2)
    for s in order:
        offsets[s] = cursor
        cursor += ranks[s] + rng.choice([0, 0, 1, 3])  # reserved rows: the adapter's rank elsewhere is larger
    a = torch.full((cursor + 1, d_in), float("nan"), device=device)
    b = torch.full((cursor + 1, d_out), float("nan"), device=device)
    a[cursor], b[cursor] = 0.0, 0.0  # the zero row
    scales = torch.zeros(len(ranks), device=device)
    for s in order:
        o, r = offsets[s], ranks[s]
        a[o : o + r] = torch.randn(r, d_in, generator=g, device=device) * a_scale
        b[o : o + r] = torch.randn(r, d_out, generator=g, device=device) * b_scale
        scales[s] = rng.uniform(0.25, 4.0) if r else 0.0
    return PoolTensors(a, b, scales, list(ranks), offsets)


@dataclass
class OpCase:
    """weights: pools a [N+1, in], b [N+1, out], scales [S+1] (slot 0 and rank-0 slots scale 0); x: [T, in];
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
    """``random_pool`` as ``LoraWeights``: slot s at rank ``ranks[s]`` <= ``max_rank``, slot 0 empty."""
    assert len(ranks) == num_slots + 1 and max(ranks) <= max_rank and ranks[0] == 0
    return random_pool(ranks, d_in, d_out, seed, device).weights()


def make_case(seed: int, d_in: int = 24, d_out: int = 40, max_rank: int = 16, tokens: int | None = None,
              sorted_slots: bool = False, strided_x: bool = False, mixed: bool = False) -> OpCase:  # fmt: skip
    """A random step over 6 adapter slots (ranks 0..max_rank) and base tokens; ``mixed``: 8 slots whose ranks
    include every one of ``MIXED_RANKS`` (and a rank-0 slot)."""
    rng = random.Random(seed)
    if mixed:
        num_slots = len(MIXED_RANKS) + 3
        chosen = MIXED_RANKS + [0, rng.choice(MIXED_RANKS), rng.choice(MIXED_RANKS)]
        rng.shuffle(chosen)
        ranks = [0, *chosen]
    else:
        num_slots = 6
        ranks = [0] + [min(max_rank, rng.choice([0, 1, 3, 4, 7, 8, max_rank])) for _ in range(num_slots)]
    weights = random_weights(num_slots, max(max_rank, *ranks), d_in, d_out, ranks, seed)
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
