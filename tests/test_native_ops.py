"""The C LoRA kernel: equals the reference op, builds once per machine, and leaves the torch op in charge where it
cannot be built."""

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from server.lora import native_build, native_ops, ops
from server.lora.mapping import TokenSlotMapping
from server.lora.native_build import NativeBuildError, build, find_compiler
from server.lora.native_ops import lora_add_native, native_usable
from server.lora.ops import LORA_OPS, SlotViews, lora_add_reference, select_op

needs_native = pytest.mark.skipif(not native_usable(), reason="no native LoRA kernel on this machine")


def test_kernel_is_usable_wherever_a_compiler_is() -> None:
    """Keeps the skips below honest: with a C compiler here, the kernel must build and pass its self-check."""
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert native_usable()
    library = native_build.shared_library()
    assert library is not None and library.path.is_file()


def _case(seed: int, d_in: int, d_out: int, max_rank: int, tokens: int, sorted_slots: bool):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_slots = 6
    ranks = [0] + [min(max_rank, rng.choice([0, 1, 3, 4, 7, 8, max_rank])) for _ in range(num_slots)]
    a, b = torch.zeros(num_slots + 1, max_rank, d_in), torch.zeros(num_slots + 1, max_rank, d_out)
    for slot in range(1, num_slots + 1):
        a[slot, : ranks[slot]] = torch.randn(ranks[slot], d_in, generator=g)
        b[slot, : ranks[slot]] = torch.randn(ranks[slot], d_out, generator=g)
    scales = torch.tensor([0.0] + [rng.uniform(0.25, 4.0) for _ in range(num_slots)])
    slots = [rng.randrange(num_slots + 1) for _ in range(tokens)]
    if sorted_slots:
        slots.sort()
    return a, b, scales, ranks, slots


@needs_native
@pytest.mark.parametrize("sorted_slots", [True, False])
@pytest.mark.parametrize(
    ("d_in", "d_out", "max_rank", "tokens"),
    [(64, 96, 16, 40), (37, 45, 8, 23), (576, 192, 16, 33), (16, 1536, 64, 9), (200, 31, 5, 300), (8, 8, 1, 1)],
)
def test_native_equals_reference(d_in: int, d_out: int, max_rank: int, tokens: int, sorted_slots: bool) -> None:
    """Widths on and off the 16-float vector, ranks on and off blocks of four, runs of 1..many rows, base tokens."""
    seed = d_in + d_out + tokens + sorted_slots
    a, b, scales, ranks, slots = _case(seed, d_in, d_out, max_rank, tokens, sorted_slots)
    mapping = TokenSlotMapping.build(slots)  # the short-run grid may be built too: the native op ignores it
    assert mapping.run_table is not None
    assert [tuple(r) for r in mapping.run_table.tolist()] == [
        run for run in TokenSlotMapping.build(slots, allow_short=False).runs
    ]
    x = torch.randn(tokens, d_in + 5, generator=torch.Generator().manual_seed(seed))[:, :d_in]  # strided rows
    y0 = torch.randn(tokens, d_out, generator=torch.Generator().manual_seed(seed + 1))
    expected, got, with_views = y0.clone(), y0.clone(), y0.clone()
    lora_add_reference(expected, x, a, b, scales, ranks, mapping)
    lora_add_native(got, x, a, b, scales, ranks, mapping)
    # Float32 rounding of sums over d_in and the rank, in another order than the reference's: relative to the size
    # of what was added.
    added = float((expected - y0).abs().max())
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, added), rtol=1e-5)
    lora_add_native(with_views, x, a, b, scales, ranks, mapping, SlotViews.build(a, b, scales, ranks))
    assert torch.equal(with_views, got)
    base_rows = [t for t, s in enumerate(slots) if s == 0 or ranks[s] == 0]
    assert torch.equal(got[base_rows], y0[base_rows])  # tokens with nothing to add are untouched, to the bit


@needs_native
def test_native_threads_agree_with_one_thread() -> None:
    a, b, scales, ranks, slots = _case(7, 96, 80, 16, 203, sorted_slots=True)
    mapping = TokenSlotMapping.build(slots)
    x, y0 = torch.randn(203, 96), torch.randn(203, 80)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = y0.clone()
            lora_add_native(y, x, a, b, scales, ranks, mapping)
            results.append(y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])  # blocks are independent: the thread count changes no sum


@needs_native
def test_native_refuses_bad_input() -> None:
    a, b, scales, ranks, slots = _case(3, 16, 16, 4, 8, sorted_slots=True)
    mapping = TokenSlotMapping.build([1] * 8)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    with pytest.raises(TypeError, match="float32"):
        lora_add_native(y.double(), x.double(), a.double(), b.double(), scales.double(), ranks, mapping)
    with pytest.raises(ValueError, match="out of range"):
        lora_add_native(y, x, a, b, scales, [0, 9, 0, 0, 0, 0, 0], mapping)  # rank above the max rank
    with pytest.raises(ValueError, match="out of range"):
        lora_add_native(y, x, a, b, scales, ranks, TokenSlotMapping.build([9] * 8))  # a slot past the last entry
    untouched = y.clone()
    with pytest.raises(ValueError, match="out of range"):  # a good run, then a run past the tokens
        table = torch.tensor([[1, 0, 4], [1, 4, 12]], dtype=torch.int32)
        lora_add_native(y, x, a, b, scales, ranks, dataclasses.replace(mapping, run_table=table))
    assert torch.equal(y, untouched)  # checked before anything is written
    with pytest.raises(ValueError, match="rows"):
        lora_add_native(y[:4], x, a, b, scales, ranks, mapping)
    with pytest.raises(ValueError, match="contiguous rows"):
        lora_add_native(torch.randn(16, 8).T, x, a, b, scales, ranks, mapping)


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
    monkeypatch.setattr(native_ops, "native_usable", lambda: False)
    assert select_op("auto", torch.device("cpu")) is LORA_OPS["grouped"]
    with pytest.raises(ValueError, match="native LoRA op needs"):
        select_op("native", torch.device("cpu"))
    assert ops.native_ops is native_ops  # the module select_op consults is the one patched here


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
