"""The fast LoRA op equals the reference op on random weights, slots and layouts."""

import random

import pytest
import torch

from server.lora.mapping import TokenSlotMapping
from server.lora.ops import LORA_OPS, lora_add_reference, select_op


def _weights(slots: int, max_rank: int, d_in: int, d_out: int, ranks: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(slots + 1, max_rank, d_in)
    b = torch.zeros(slots + 1, max_rank, d_out)
    scales = torch.zeros(slots + 1)
    for s in range(1, slots + 1):
        r = ranks[s]
        a[s, :r] = torch.randn(r, d_in, generator=g)
        b[s, :r] = torch.randn(r, d_out, generator=g)
        scales[s] = 0.5 + s / 4
    return a, b, scales


@pytest.mark.parametrize("allow_padded", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_grouped_equals_reference(seed: int, allow_padded: bool) -> None:
    rng = random.Random(seed)
    num_slots, max_rank, d_in, d_out = 5, 16, 24, 40
    ranks = [0] + [rng.choice([0, 1, 4, 8, 16]) for _ in range(num_slots)]
    a, b, scales = _weights(num_slots, max_rank, d_in, d_out, ranks, seed)
    tokens = rng.randint(1, 60)
    if seed % 2:  # contiguous runs, one per slot
        slots = sorted(rng.choice(range(num_slots + 1)) for _ in range(tokens))
    else:
        slots = [rng.choice(range(num_slots + 1)) for _ in range(tokens)]
    mapping = TokenSlotMapping.build(slots, allow_padded=allow_padded)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(seed))
    y0 = torch.randn(tokens, d_out, generator=torch.Generator().manual_seed(seed + 1))
    expected, got = y0.clone(), y0.clone()
    lora_add_reference(expected, x, a, b, scales, ranks, mapping)
    LORA_OPS["grouped"](got, x, a, b, scales, ranks, mapping)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    # Base-slot tokens are untouched, to the bit.
    base_rows = [t for t, s in enumerate(slots) if s == 0]
    assert torch.equal(got[base_rows], y0[base_rows])


def test_padded_layout_is_chosen_for_many_small_groups() -> None:
    decode = TokenSlotMapping.build([1, 2, 3, 4, 5, 0, 6, 7, 8, 2])
    assert decode.padded is not None and decode.padded.rows == 2 and (decode.padded.lo, decode.padded.hi) == (1, 9)
    assert decode.padded.tokens.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert decode.padded.cells.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 3]  # slot 2's second token: row 1
    assert decode.padded.run is None and len(decode.padded.gather) == 16
    prefill = TokenSlotMapping.build([1] * 50 + [2, 3, 4, 5])  # one big group: padding would cost 5x
    assert prefill.padded is None
    few = TokenSlotMapping.build([1, 2, 1, 2])  # too few groups for padding to pay
    assert few.padded is None


@pytest.mark.parametrize("slots", [[0, 0, 3, 4, 5, 6, 7, 0], [1, 2, 3, 4, 5], [0, 2, 3, 5, 6, 7], [4, 5, 6, 7, 4]])
def test_padded_run_and_gather_layouts_equal_reference(slots: list[int]) -> None:
    """One token per slot in slot order is added in place (``run``); gaps or repeats take the gather path."""
    torch.manual_seed(sum(slots))
    mapping = TokenSlotMapping.build(slots)
    assert mapping.padded is not None
    contiguous = slots[2:7] == [3, 4, 5, 6, 7] or slots == [1, 2, 3, 4, 5]
    assert (mapping.padded.run is not None) == contiguous
    num_slots, rank, d_in, d_out = 8, 6, 12, 10
    a, b = torch.randn(num_slots + 1, rank, d_in), torch.randn(num_slots + 1, rank, d_out)
    a[0], b[0] = 0, 0
    scales = torch.rand(num_slots + 1)
    scales[0] = 0
    x, y0 = torch.randn(len(slots), d_in), torch.randn(len(slots), d_out)
    expected, got = y0.clone(), y0.clone()
    lora_add_reference(expected, x, a, b, scales, [0] + [rank] * num_slots, mapping)
    LORA_OPS["grouped"](got, x, a, b, scales, [0] + [rank] * num_slots, mapping)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_mapping_layouts() -> None:
    m = TokenSlotMapping.build([0, 2, 2, 0, 1, 1])
    assert not m.gathered and m.segments == ((2, 1, 3), (1, 4, 6))
    m = TokenSlotMapping.build([1, 2, 1, 0])
    assert m.gathered and m.segments == ((1, 0, 2), (2, 2, 3)) and m.order.tolist() == [0, 2, 1]
    m = TokenSlotMapping.build([0, 0])
    assert m.segments == () and m.slots_in_use == frozenset()
    assert TokenSlotMapping.for_rows([3, 0], [2, 1]).token_slots.tolist() == [3, 3, 0]


def test_select_op() -> None:
    assert select_op("auto", torch.device("cpu")) is LORA_OPS["grouped"]
    with pytest.raises(ValueError, match="unknown LoRA op"):
        select_op("nope", torch.device("cpu"))
