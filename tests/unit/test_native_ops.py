"""The C LoRA kernel: equals the reference op, builds once per machine, and leaves the torch op in charge where it
cannot be built."""

import json
import sys
from pathlib import Path

import pytest
import torch

from server.kernels import select
from server.kernels.mapping import TokenSlotMapping
from server.kernels.native import build as native_build
from server.kernels.native import ops as native_ops
from server.kernels.native.build import NativeBuildError, build, find_compiler
from server.kernels.native.ops import NativeOp, lora_add_native, native_usable
from server.kernels.select import LORA_OPS, select_op
from tests.helpers.lora_op_cases import OpCase, apply_op, make_case, reference_result

needs_native = pytest.mark.skipif(not native_usable(), reason="no native LoRA kernel on this machine")


def test_kernel_is_usable_wherever_a_compiler_is() -> None:
    """Keeps the skips below honest: with a C compiler here, the kernel must build and pass its self-check."""
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert native_usable()
    library = native_build.shared_library()
    assert library is not None and library.path.is_file()


def _tables(case: OpCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The native op's slot table ((offset, rank) of each slot) and this step's run table."""
    meta = NativeOp().prepare(TokenSlotMapping.build(case.slots))
    return case.weights.slot_table, meta.run_table


@needs_native
@pytest.mark.parametrize("sorted_slots", [True, False])
@pytest.mark.parametrize(
    ("d_in", "d_out", "max_rank", "tokens"),
    [(64, 96, 16, 40), (37, 45, 8, 23), (576, 192, 16, 33), (16, 1536, 64, 9), (200, 31, 5, 300), (8, 8, 1, 1)],
)
@pytest.mark.parametrize("mixed", [False, True], ids=["ranks0-R", "ranks4-64"])
def test_native_equals_reference(
    d_in: int, d_out: int, max_rank: int, tokens: int, sorted_slots: bool, mixed: bool
) -> None:
    """Widths on and off the 16-float vector, ranks on and off blocks of four, runs of 1..many rows, base tokens;
    slots out of order in the pool with NaN rows between them; ``mixed``: ranks 4..64 in one step."""
    seed = d_in + d_out + tokens + sorted_slots
    case = make_case(seed, d_in, d_out, max_rank, tokens, sorted_slots, strided_x=True, mixed=mixed)
    _, run_table = _tables(case)
    assert [tuple(r) for r in run_table.tolist()] == list(TokenSlotMapping.build(case.slots).runs)
    expected = reference_result(case)
    got = case.y0.clone()
    apply_op(NativeOp(), got, case.x, case.weights, case.slots)
    # Float32 rounding of sums over d_in and the rank, in another order than the reference's: relative to the size
    # of what was added.
    added = float((expected - case.y0).abs().max())
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, added), rtol=1e-5)
    rows = case.untouched_rows()
    assert torch.equal(got[rows], case.y0[rows])  # tokens with nothing to add are untouched, to the bit


@needs_native
def test_native_threads_agree_with_one_thread() -> None:
    case = make_case(7, 96, 80, 16, 203, sorted_slots=True)
    w, (table, runs) = case.weights, _tables(case)
    x, y0 = case.x, case.y0
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = y0.clone()
            lora_add_native(y, x, w.a, w.b, w.scales, table, runs)
            results.append(y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])  # blocks are independent: the thread count changes no sum


@needs_native
def test_native_refuses_bad_input() -> None:
    case = make_case(3, 16, 16, 4, 8, sorted_slots=True)
    a, b, scales, ranks = case.weights.a, case.weights.b, case.weights.scales, case.weights.slot_table
    runs = torch.tensor([[1, 0, 8]], dtype=torch.int32)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        lora_add_native(y.double(), x.double(), a.double(), b.double(), scales.double(), ranks, runs)
    for offset, rank in ((a.shape[0] - 2, 3), (-1, 2), (0, 1025)):  # past the pool, before it, a huge rank
        bad = ranks.clone()
        bad[1] = torch.tensor([offset, rank])
        with pytest.raises(ValueError, match="out of range"):
            lora_add_native(y, x, a, b, scales, bad, runs)
    with pytest.raises(ValueError, match="slot table"):
        lora_add_native(y, x, a, b, scales, ranks[:, 1].contiguous(), runs)  # the stacked layout's rank table
    with pytest.raises(ValueError, match="out of range"):
        lora_add_native(y, x, a, b, scales, ranks, torch.tensor([[9, 0, 8]], dtype=torch.int32))  # no slot 9
    untouched = y.clone()
    with pytest.raises(ValueError, match="out of range"):  # a good run, then a run past the tokens
        lora_add_native(y, x, a, b, scales, ranks, torch.tensor([[1, 0, 4], [1, 4, 12]], dtype=torch.int32))
    assert torch.equal(y, untouched)  # checked before anything is written
    with pytest.raises(ValueError, match="rows"):
        lora_add_native(y[:4], x, a, b, scales, ranks, runs)
    with pytest.raises(ValueError, match="contiguous rows"):
        lora_add_native(torch.randn(16, 8).T, x, a, b, scales, ranks, runs)


def test_build_is_cached_and_atomic(tmp_path: Path) -> None:
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    first, flags, _ = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    second, again, _ = build(tmp_path)
    assert (second, again) == (first, flags) and second.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


def test_no_compiler_or_failing_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(NativeBuildError, match="no C compiler"):
        build(tmp_path)
    monkeypatch.setenv("CC", "false")  # exists, fails every flag set
    with pytest.raises(NativeBuildError, match="could not compile"):
        build(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_auto_falls_back_to_the_torch_op_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_ops, "native_usable", lambda dtype=torch.float32: False)
    assert select_op("auto", torch.device("cpu")) is LORA_OPS["grouped"]
    with pytest.raises(ValueError, match="native LoRA op needs"):
        select_op("native", torch.device("cpu"))
    assert select.native_ops is native_ops  # the module select_op consults is the one patched here


@needs_native
def test_bench_lora_ops_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """loadtests/bench_lora_ops.py keeps working (one layer, one round; the real run is by hand)."""
    from loadtests.bench_lora_ops import main

    out = tmp_path / "ops.json"
    argv = ["bench_lora_ops.py", "--layers", "1", "--slots", "32", "--repeats", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    figures = json.loads(out.read_text())["ms"]
    assert len(figures) == 7 and all(set(row) == {"grouped", "native"} for row in figures.values())
