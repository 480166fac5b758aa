"""The fast LoRA op equals the reference op on random weights, slots and layouts."""

import random

import pytest
import torch

from server.lora import mapping as mapping_module
from server.lora.mapping import TokenSlotMapping
from server.lora.native_ops import native_usable
from server.lora.ops import LORA_OPS, SlotViews, lora_add_reference, select_op


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


@pytest.fixture
def grid_from_four_short_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small cases reach the short-run grid (the default threshold is tuned for 32-row decode steps)."""
    monkeypatch.setattr(mapping_module, "MIN_SHORT_RUNS", 4)


@pytest.mark.usefixtures("grid_from_four_short_runs")
@pytest.mark.parametrize("allow_short", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_grouped_equals_reference(seed: int, allow_short: bool) -> None:
    rng = random.Random(seed)
    num_slots, max_rank, d_in, d_out = 5, 16, 24, 40
    ranks = [0] + [rng.choice([0, 1, 4, 8, 16]) for _ in range(num_slots)]
    a, b, scales = _weights(num_slots, max_rank, d_in, d_out, ranks, seed)
    tokens = rng.randint(1, 60)
    if seed % 2:  # contiguous runs, one per slot
        slots = sorted(rng.choice(range(num_slots + 1)) for _ in range(tokens))
    else:
        slots = [rng.choice(range(num_slots + 1)) for _ in range(tokens)]
    mapping = TokenSlotMapping.build(slots, allow_short=allow_short)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(seed))
    y0 = torch.randn(tokens, d_out, generator=torch.Generator().manual_seed(seed + 1))
    expected, got = y0.clone(), y0.clone()
    lora_add_reference(expected, x, a, b, scales, ranks, mapping)
    LORA_OPS["grouped"](got, x, a, b, scales, ranks, mapping)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    # The layer's cached per-slot views give the same answer as views taken per call.
    with_views = y0.clone()
    LORA_OPS["grouped"](with_views, x, a, b, scales, ranks, mapping, SlotViews.build(a, b, scales, ranks))
    torch.testing.assert_close(with_views, got, atol=1e-5, rtol=1e-6)
    # Base-slot tokens are untouched, to the bit.
    base_rows = [t for t, s in enumerate(slots) if s == 0]
    assert torch.equal(got[base_rows], y0[base_rows])


@pytest.mark.usefixtures("grid_from_four_short_runs")
def test_short_runs_form_a_slot_grid_and_long_runs_stay_dense() -> None:
    decode = TokenSlotMapping.build([0, 1, 2, 2, 3, 4, 5] + [6] * 20)
    assert decode.runs == ((6, 7, 27),)  # the prompt chunk: dense matmuls
    short = decode.short
    assert short is not None and short.distinct == (1, 2, 3, 4, 5) and short.rows == 2 and short.span is None
    assert short.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert short.cells.tolist() == [0, 2, 3, 4, 6, 8]  # slot 2's second token: row 1 of its grid line
    assert short.gather.tolist() == [1, 1, 2, 3, 4, 4, 5, 5, 6, 6]  # padding cells repeat a token of their slot
    one_each = TokenSlotMapping.build([0, 0, 3, 4, 5, 6])  # one token per slot in slot order: a view of x
    assert one_each.short is not None and one_each.short.span == (2, 6) and one_each.short.gather.numel() == 0
    crowded = TokenSlotMapping.build([1, 2, 3, 4] + [5, 0] * 9)  # slot 5's nine short runs would pad every line
    assert crowded.short is not None and crowded.short.distinct == (1, 2, 3, 4) and len(crowded.runs) == 9
    few = TokenSlotMapping.build([1, 2, 1] + [3] * 30)  # too few short runs for the grid to pay
    assert few.short is None and len(few.runs) == 4
    assert TokenSlotMapping.build([1, 2, 3, 4, 5], allow_short=False).short is None


@pytest.mark.usefixtures("grid_from_four_short_runs")
@pytest.mark.parametrize(
    ("slots", "span"),
    [([0, 0, 3, 4, 5, 6, 7, 0], True), ([1, 2, 3, 4, 5], True), ([0, 2, 3, 0, 6, 7], False), ([4, 5, 6, 7, 4], False)],
)
def test_short_run_span_and_gather_equal_reference(slots: list[int], span: bool) -> None:
    """One token per slot in slot order is added in place; gaps or repeats take the gather path."""
    torch.manual_seed(sum(slots))
    mapping = TokenSlotMapping.build(slots)
    assert mapping.short is not None
    assert (mapping.short.span is not None) == span
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
    expected = "native" if native_usable() else "grouped"
    assert select_op("auto", torch.device("cpu")) is LORA_OPS[expected]
    assert select_op("auto", torch.device("cpu"), torch.bfloat16) is LORA_OPS["grouped"]  # native is float32 only
    with pytest.raises(ValueError, match="unknown LoRA op"):
        select_op("nope", torch.device("cpu"))
