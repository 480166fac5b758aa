"""The bfloat16 C LoRA kernel (``lora_runs_bf16.c``): equals the reference op computed in float32 from the same
bfloat16 values, on every shape the float32 kernel's tests cover, within one bfloat16 rounding of the output.

Tolerance: the kernel sums in float32 (in another order than the reference) and rounds each y element to bfloat16
once, to nearest even: |got - exact| <= 2^-8 |exact| (half a unit in bfloat16's last place) plus float32 summation
noise. The tests allow exactly that, 2^-8 |exact| + 1e-5 x (largest value added): a scale off by 2%, a rank row
skipped, or rounding by truncation instead of to nearest is outside it.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from server.kernels import select
from server.kernels.mapping import TokenSlotMapping
from server.kernels.native import build as native_build
from server.kernels.native import ops as native_ops
from server.kernels.native.build import find_compiler
from server.kernels.native.ops import NativeOp, lora_add_native, native_usable
from server.kernels.protocol import LoraWeights
from server.kernels.reference import ReferenceOp
from server.kernels.select import LORA_OPS, select_op
from tests.helpers.lora_op_cases import MIXED_RANKS, apply_op, make_case, random_pool

BF16 = torch.bfloat16
needs_bf16 = pytest.mark.skipif(not native_usable(BF16), reason="no native bfloat16 LoRA kernel on this machine")
RTOL = 2.0**-8  # one bfloat16 rounding of y to nearest


def test_bf16_kernel_is_usable_wherever_a_compiler_is() -> None:
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert native_usable(BF16)
    library = native_build.shared_bf16_library()
    assert library is not None and library.path.is_file()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "avx512_bf16" not in cpuinfo.read_text():
        assert not library.uses_dpbf16  # -march=native never turns the AVX512-BF16 path on where the CPU lacks it


def bf16_step(seed: int, d_in: int, d_out: int, max_rank: int, tokens: int | None, sorted_slots: bool, mixed: bool,
               scale_error: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:  # fmt: skip
    """(got, expected, y0) for one random step: ``got`` by the bfloat16 kernel with x strided, ``expected`` by the
    reference op in float32 on the same (bfloat16-rounded) values; ``scale_error`` multiplies the kernel's scales."""
    case = make_case(seed, d_in, d_out, max_rank, tokens, sorted_slots, strided_x=True, mixed=mixed)
    w = case.weights
    a, b, scales = (t.to(BF16) for t in (w.a, w.b, w.scales))
    x = torch.empty(case.x.shape[0], d_in + 5, dtype=BF16)[:, :d_in].copy_(case.x)  # strided rows, in bfloat16
    y0 = case.y0.to(BF16)
    expected = y0.float()
    reference_weights = LoraWeights.build(a.float(), b.float(), scales.float(), w.ranks, w.offsets)
    apply_op(ReferenceOp(), expected, x.float(), reference_weights, case.slots)
    got = y0.clone()
    weights = LoraWeights.build(a, b, (scales.float() * scale_error).to(BF16), w.ranks, w.offsets)
    apply_op(NativeOp(), got, x, weights, case.slots)
    untouched = [t for t, s in enumerate(case.slots) if w.ranks[s] == 0]
    assert torch.equal(got[untouched], y0[untouched])  # tokens with nothing to add are untouched, to the bit
    return got, expected, y0, case.slots


def assert_within_bf16(got: torch.Tensor, expected: torch.Tensor, y0: torch.Tensor) -> None:
    assert got.dtype == BF16
    added = float((expected - y0.float()).abs().max())
    torch.testing.assert_close(got.float(), expected, atol=1e-5 * max(1.0, added), rtol=RTOL)


@needs_bf16
@pytest.mark.parametrize("sorted_slots", [True, False])
@pytest.mark.parametrize(
    ("d_in", "d_out", "max_rank", "tokens"),
    [(64, 96, 16, 40), (37, 45, 8, 23), (576, 192, 16, 33), (16, 1536, 64, 9), (200, 31, 5, 300), (8, 8, 1, 1)],
)
@pytest.mark.parametrize("mixed", [False, True], ids=["ranks0-R", "ranks4-64"])
def test_bf16_native_equals_reference(
    d_in: int, d_out: int, max_rank: int, tokens: int, sorted_slots: bool, mixed: bool
) -> None:
    """The float32 kernel's cases (tests/unit/test_native_ops.py): widths on and off the vector (and off the 32
    bfloat16 of one dpbf16), ranks on and off blocks of four, runs of 1..many rows, base tokens, NaN rows between
    slots (never read), ``mixed``: ranks 4..64 in one step."""
    seed = d_in + d_out + tokens + sorted_slots
    got, expected, y0, _ = bf16_step(seed, d_in, d_out, max_rank, tokens, sorted_slots, mixed)
    assert_within_bf16(got, expected, y0)


@needs_bf16
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mixed", [False, True])
def test_bf16_native_equals_reference_on_random_steps(seed: int, mixed: bool) -> None:
    """test_ops.py's random steps (1..60 tokens, slots unsorted, 24 -> 40 features, or ranks 4..64)."""
    got, expected, y0, _ = bf16_step(seed, 24, 40, 64 if mixed else 16, None, False, mixed)
    assert_within_bf16(got, expected, y0)


@needs_bf16
def test_bf16_decode_step_mixing_ranks_4_to_64() -> None:
    """One decode token per adapter at ranks 4..64, at a SmolLM2-135M width (576 -> 1536)."""
    ranks = [0, *MIXED_RANKS, 8, 64, 4]
    pool = random_pool(ranks, 576, 1536, seed=11)
    slots = [0, *range(1, len(ranks)), 0, 3]
    a, b, scales = (t.to(BF16) for t in (pool.a, pool.b, pool.scales))
    g = torch.Generator().manual_seed(3)
    x, y0 = torch.randn(len(slots), 576, generator=g).to(BF16), torch.randn(len(slots), 1536, generator=g).to(BF16)
    expected = y0.float()
    apply_op(ReferenceOp(), expected, x.float(), LoraWeights.build(a.float(), b.float(), scales.float(), ranks,
                                                                   pool.offsets), slots)  # fmt: skip
    got = y0.clone()
    apply_op(NativeOp(), got, x, LoraWeights.build(a, b, scales, ranks, pool.offsets), slots)
    assert_within_bf16(got, expected, y0)


@needs_bf16
@pytest.mark.parametrize("scale_error", [1.02, 0.98])
def test_a_wrong_scale_fails_the_tolerance(scale_error: float) -> None:
    """The tolerance is tight enough to catch a 2% error in the scale (a mutation of the kernel's arithmetic)."""
    got, expected, y0, _ = bf16_step(5, 64, 96, 16, 40, True, True, scale_error=scale_error)
    with pytest.raises(AssertionError):
        assert_within_bf16(got, expected, y0)


@needs_bf16
def test_bf16_threads_agree_with_one_thread() -> None:
    case = make_case(7, 96, 80, 16, 203, sorted_slots=True)
    w = case.weights
    a, b, scales, x, y0 = (t.to(BF16) for t in (w.a, w.b, w.scales, case.x, case.y0))
    runs = NativeOp().prepare(TokenSlotMapping.build(case.slots)).run_table
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = y0.clone()
            lora_add_native(y, x, a, b, scales, w.slot_table, runs)
            results.append(y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


@needs_bf16
def test_bf16_refuses_mixed_dtypes_and_bad_input() -> None:
    case = make_case(3, 16, 16, 4, 8, sorted_slots=True)
    w = case.weights
    a, b, scales = (t.to(BF16) for t in (w.a, w.b, w.scales))
    runs = torch.tensor([[1, 0, 8]], dtype=torch.int32)
    x, y = torch.randn(8, 16, dtype=BF16), torch.randn(8, 16, dtype=BF16)
    with pytest.raises(TypeError, match="all of one dtype"):
        lora_add_native(y, x, a, b, w.scales, w.slot_table, runs)  # float32 scales with bfloat16 pools
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        lora_add_native(y.half(), x.half(), a.half(), b.half(), scales.half(), w.slot_table, runs)
    untouched = y.clone()
    with pytest.raises(ValueError, match="out of range"):  # a good run, then a run past the tokens
        lora_add_native(y, x, a, b, scales, w.slot_table, torch.tensor([[1, 0, 4], [1, 4, 12]], dtype=torch.int32))
    assert torch.equal(y, untouched)


def test_select_takes_native_for_bf16_on_cpu_when_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = "native" if native_usable(BF16) else "grouped"
    assert select_op("auto", torch.device("cpu"), BF16) is LORA_OPS[expected]
    assert select_op("auto", torch.device("cpu"), torch.float16) is LORA_OPS["grouped"]  # no float16 kernel
    monkeypatch.setattr(native_ops, "native_usable", lambda dtype=torch.float32: dtype != BF16)
    assert select_op("auto", torch.device("cpu"), BF16) is LORA_OPS["grouped"]
    with pytest.raises(ValueError, match="native LoRA op needs"):
        select_op("native", torch.device("cpu"), BF16)
    assert select.native_ops is native_ops


@needs_bf16
def test_bench_bf16_ops_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """loadtests/bench_bf16.py's op part keeps working (one call each; the real run is by hand, docs/benchmarks.md)."""
    from loadtests.bench_bf16 import SHAPES, main

    out = tmp_path / "bf16.json"
    monkeypatch.setattr(sys, "argv", ["bench_bf16.py", "--parts", "ops", "--repeats", "1", "--json", str(out)])
    main()
    figures = json.loads(out.read_text())["ops_us"]
    assert set(figures) == set(SHAPES)
    assert {"lora native bfloat16", "lora grouped bfloat16", "lora native float32"} <= set(figures["q,o 576x576"])
