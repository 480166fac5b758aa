"""Every registered LoRA op equals the reference op on random weights, slots and layouts; the grouped op's grid."""

import pytest
import torch

from server.kernels import grouped as grouped_module
from server.kernels.grouped import GroupedOp
from server.kernels.mapping import TokenSlotMapping
from server.kernels.native.ops import native_usable
from server.kernels.protocol import LoraWeights
from server.kernels.select import LORA_OPS, select_op
from tests.helpers.lora_op_cases import MIXED_RANKS, apply_op, make_case, random_pool, random_weights, reference_result

# Every op this process can run: Triton's run in tests/model/test_triton_ops.py (its interpreter needs its own process).
CPU_OPS = ["grouped", "grouped_dense", *(["native"] if native_usable() else [])]


def _op(name: str):
    return GroupedOp(short_grid=False) if name == "grouped_dense" else LORA_OPS[name]


@pytest.fixture
def grid_from_four_short_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small cases reach the short-run grid (the default threshold is tuned for 32-row decode steps)."""
    monkeypatch.setattr(grouped_module, "MIN_SHORT_RUNS", 4)


@pytest.mark.usefixtures("grid_from_four_short_runs")
@pytest.mark.parametrize("mixed", [False, True], ids=["ranks0-16", "ranks4-64"])
@pytest.mark.parametrize("sorted_slots", [False, True])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("op", CPU_OPS)
def test_op_equals_reference(op: str, seed: int, sorted_slots: bool, mixed: bool) -> None:
    """Pools with slots out of order, gaps and reserved rows full of NaN (never read); ``mixed``: ranks 4..64 in one
    step."""
    max_rank = 64 if mixed else 16
    case = make_case(seed, sorted_slots=sorted_slots, strided_x=seed % 3 == 0, mixed=mixed, max_rank=max_rank)
    if mixed:
        assert set(MIXED_RANKS) <= {case.weights.ranks[s] for s in case.slots} or len(case.slots) < 20
    expected = reference_result(case)
    got = case.y0.clone()
    apply_op(_op(op), got, case.x, case.weights, case.slots)
    added = float((expected - case.y0).abs().max())  # float32 sums in another order: relative to what was added
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, added), rtol=1e-5)
    rows = case.untouched_rows()
    assert torch.equal(got[rows], case.y0[rows])  # tokens with nothing to add are untouched, to the bit


@pytest.mark.usefixtures("grid_from_four_short_runs")
def test_short_runs_form_a_slot_grid_and_long_runs_stay_dense() -> None:
    def grouped_meta(slots: list[int], short_grid: bool = True):
        return GroupedOp(short_grid).prepare(TokenSlotMapping.build(slots))

    decode = grouped_meta([0, 1, 2, 2, 3, 4, 5] + [6] * 20)
    assert decode.runs == ((6, 7, 27),)  # the prompt chunk: dense matmuls
    short = decode.short
    assert short is not None and short.distinct == (1, 2, 3, 4, 5) and short.rows == 2 and short.span is None
    assert short.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert short.cells.tolist() == [0, 2, 3, 4, 6, 8]  # slot 2's second token: row 1 of its grid line
    assert short.gather.tolist() == [1, 1, 2, 3, 4, 4, 5, 5, 6, 6]  # padding cells repeat a token of their slot
    one_each = grouped_meta([0, 0, 3, 4, 5, 6])  # one token per slot in slot order: a view of x
    assert one_each.short is not None and one_each.short.span == (2, 6) and one_each.short.gather.numel() == 0
    crowded = grouped_meta([1, 2, 3, 4] + [5, 0] * 9)  # slot 5's nine short runs would pad every line
    assert crowded.short is not None and crowded.short.distinct == (1, 2, 3, 4) and len(crowded.runs) == 9
    few = grouped_meta([1, 2, 1] + [3] * 30)  # too few short runs for the grid to pay
    assert few.short is None and len(few.runs) == 4
    assert grouped_meta([1, 2, 3, 4, 5], short_grid=False).short is None


@pytest.mark.usefixtures("grid_from_four_short_runs")
@pytest.mark.parametrize(
    ("slots", "span"),
    [([0, 0, 3, 4, 5, 6, 7, 0], True), ([1, 2, 3, 4, 5], True), ([0, 2, 3, 0, 6, 7], False), ([4, 5, 6, 7, 4], False)],
)
def test_short_run_span_and_gather_equal_reference(slots: list[int], span: bool) -> None:
    """One token per slot in slot order is added in place; gaps or repeats take the gather path."""
    torch.manual_seed(sum(slots))
    meta = GroupedOp().prepare(TokenSlotMapping.build(slots))
    assert meta.short is not None
    assert (meta.short.span is not None) == span
    num_slots, rank, d_in, d_out = 8, 6, 12, 10
    weights = random_weights(num_slots, rank, d_in, d_out, [0] + [rank] * num_slots, seed=sum(slots))
    x, y0 = torch.randn(len(slots), d_in), torch.randn(len(slots), d_out)
    expected, got = y0.clone(), y0.clone()
    apply_op(LORA_OPS["reference"], expected, x, weights, slots)
    LORA_OPS["grouped"].add(got, x, weights, meta)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_mapping_layouts() -> None:
    m = TokenSlotMapping.build([0, 2, 2, 0, 1, 1])
    assert not m.gathered and m.runs == ((2, 1, 3), (1, 4, 6)) and m.num_tokens == 6
    m = TokenSlotMapping.build([1, 2, 1, 0])
    assert m.gathered and m.runs == ((1, 0, 1), (2, 1, 2), (1, 2, 3)) and m.token_slots().tolist() == [1, 2, 1, 0]
    m = TokenSlotMapping.build([0, 0])
    assert m.runs == () and not m.gathered


def test_layer_weights_views_follow_writes() -> None:
    """LoraWeights.set keeps the per-slot views, offsets, ranks and slot table the ops read in step with the pool."""
    weights = LoraWeights(torch.zeros(9, 5), torch.zeros(9, 6), torch.zeros(3))
    assert weights.pool_rows == 8 and weights.zero_row == 8
    weights.a[4:7], weights.b[4:7] = 1.0, 2.0
    version = weights.version
    weights.set(2, 4, 3, 0.5)
    view = weights.of[2]
    assert view is not None
    a_t, b_r, scale = view
    assert a_t.shape == (5, 3) and b_r.shape == (3, 6) and scale == 0.5
    assert a_t.data_ptr() == weights.a[4].data_ptr()  # a view of the pool, not a copy
    assert weights.ranks == [0, 0, 3] and weights.offsets == [0, 0, 4]
    assert weights.slot_table.tolist() == [[0, 0], [0, 0], [4, 3]] and weights.version == version + 1
    with pytest.raises(ValueError, match="outside the pool"):
        weights.set(1, 6, 3, 1.0)  # rows 6..8: the zero row is not the slots'
    weights.set(2, 0, 0, 0.0)
    assert weights.of[2] is None and weights.ranks == [0, 0, 0] and weights.slot_table.tolist()[2] == [0, 0]


def test_stacked_weights_become_a_pool() -> None:
    """LoraWeights.build of the stacked layout ([S+1, R, in], benchmarks) copies slot s to rows s * R."""
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    weights = LoraWeights.build(a, b, torch.ones(3), [0, 4, 2])
    assert weights.a.shape == (13, 5) and weights.offsets == [0, 4, 8] and weights.ranks == [0, 4, 2]
    assert torch.equal(weights.a[8:10], a[2, :2]) and not weights.a[12].any() and not weights.b[12].any()


@pytest.mark.usefixtures("grid_from_four_short_runs")
@pytest.mark.parametrize("op", CPU_OPS)
def test_decode_step_mixing_ranks_4_to_64(op: str) -> None:
    """One decode token per adapter, ranks 4..64 mixed (the grid pads each slot to 64 with the zero row), and two
    layers of one model: the same offsets, other ranks (an adapter targets one module at a lower rank, skips one)."""
    ranks = [0, *MIXED_RANKS, 8, 64, 4]
    slots = [0, *range(1, len(ranks)), 0, 3]
    layer_ranks = [ranks, [0, 4, 8, 0, 32, 2, 8, 64, 4]]  # slot 3 has rank 0 in the second layer
    first = random_pool(ranks, 48, 40, seed=11)
    for i, rs in enumerate(layer_ranks):
        pool = random_pool(rs, 48, 40, seed=11 + i)
        pool.offsets = first.offsets  # one placement for all layers, each layer at its own rank
        pool.a = torch.full((first.a.shape[0], 48), float("nan"))
        pool.b = torch.full((first.a.shape[0], 40), float("nan"))
        pool.a[-1], pool.b[-1] = 0.0, 0.0
        g = torch.Generator().manual_seed(i)
        for s, r in enumerate(rs):
            o = first.offsets[s]
            pool.a[o : o + r], pool.b[o : o + r] = torch.randn(r, 48, generator=g), torch.randn(r, 40, generator=g)
        weights = pool.weights()
        x, y0 = torch.randn(len(slots), 48, generator=g), torch.randn(len(slots), 40, generator=g)
        expected, got = y0.clone(), y0.clone()
        apply_op(LORA_OPS["reference"], expected, x, weights, slots)
        apply_op(_op(op), got, x, weights, slots)
        added = float((expected - y0).abs().max())
        torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, added), rtol=1e-5)
        assert torch.isfinite(got).all() and added > 1.0


def test_select_op() -> None:
    expected = "native" if native_usable() else "grouped"
    assert select_op("auto", torch.device("cpu")) is LORA_OPS[expected]
    bf16 = "native" if native_usable(torch.bfloat16) else "grouped"  # tests/unit/test_native_bf16.py
    assert select_op("auto", torch.device("cpu"), torch.bfloat16) is LORA_OPS[bf16]
    with pytest.raises(ValueError, match="unknown LoRA op"):
        select_op("nope", torch.device("cpu"))
