"""The Triton LoRA kernels equal the torch reference op: under Triton's interpreter on CPU, and on CUDA.

Triton decides interpreter or compiler when it is first imported (``TRITON_INTERPRET=1``), so the CPU cases
(``test_interp_*``) run in a subprocess with that variable set (``test_interpreter_suite``); the CUDA cases run
in this process and skip without a GPU. Triton itself is optional: without it everything here skips but the plan
and ``select_op`` checks, which need no kernel.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loadtests.common.lora_rows import lora_logits, row_mapping
from server.kernels.mapping import TokenSlotMapping
from server.kernels.protocol import LoraWeights
from server.kernels.select import LORA_OPS, TRITON_VALIDATED_ON_GPU, select_op
from server.kernels.triton.ops import TRITON_AVAILABLE, TritonOp, interpreting
from tests.helpers.lora_op_cases import apply_op, random_pool
from tests.helpers.paths import REPO_ROOT

INTERPRETED = interpreting()
MODES = ["triton", "triton_sgmv", "triton_bgmv"]
LAYOUTS = ["prefill", "prefill_gathered", "decode", "decode_repeats", "mixed"]
RANKS = [8, 16, 32, 64, 128]  # mixed in one batch, max rank 128
TOLERANCES = {  # (atol, rtol) against float32 arithmetic on the same (rounded) inputs
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (5e-2, 2e-2),
}

needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
interpreter_only = pytest.mark.skipif(
    not (TRITON_AVAILABLE and INTERPRETED), reason="runs in test_interpreter_suite's TRITON_INTERPRET=1 subprocess"
)
needs_cuda = pytest.mark.skipif(
    not (TRITON_AVAILABLE and torch.cuda.is_available()) or INTERPRETED, reason="needs triton and a CUDA GPU"
)


def _slots(layout: str, num_slots: int, rng: random.Random, row_len: tuple[int, int], rows: int) -> list[int]:
    """Flattened token slots of one step; slot num_slots has rank 0 for the layer (adapter that skips it)."""
    adapters = list(range(1, num_slots + 1))
    if layout == "prefill":  # multi-token rows sorted by slot, as the model runner lays them out
        chosen = sorted([0, *rng.sample(adapters, rows - 1)])
        return [s for s in chosen for _ in range(rng.randint(*row_len))]
    if layout == "prefill_gathered":  # a slot's rows far apart: segments index x[order]
        return [s for s in (1, 0, 2, 1, 3, 2) for _ in range(rng.randint(*row_len))]
    if layout == "decode":  # one token per row, every slot once, in slot order, base rows around
        return [0, *adapters, 0]
    if layout == "decode_repeats":  # one token per row, repeats and base rows, unsorted
        return [rng.choice([0, *adapters]) for _ in range(2 * num_slots)] + [0]
    assert layout == "mixed"  # a continuous-batching step: decode tokens and one prompt chunk of one adapter
    return sorted([*adapters, 0] + [adapters[1]] * row_len[1])


def _case(layout: str, num_slots: int, d_in: int, d_out: int, seed: int, row_len: tuple[int, int], rows: int,
          device: str = "cpu"):  # fmt: skip
    """A pool of mixed ranks (the last slot rank 0; slots out of order, NaN rows between them), inputs and the
    mapping's slots, float32 on ``device``."""
    rng = random.Random(seed)
    g = torch.Generator(device).manual_seed(seed)
    ranks = [0] + [RANKS[i % len(RANKS)] for i in range(num_slots - 1)] + [0]
    pool = random_pool(ranks, d_in, d_out, seed, device, a_scale=d_in**-0.5, b_scale=0.1)
    slots = _slots(layout, num_slots, rng, row_len, rows)
    x = torch.randn(len(slots), d_in, generator=g, device=device)
    y0 = torch.randn(len(slots), d_out, generator=g, device=device)
    return slots, pool, x, y0


def _check(op: str, layout: str, dtype: torch.dtype, device: str, num_slots: int, d_in: int, d_out: int, seed: int,
           row_len: tuple[int, int], rows: int) -> None:  # fmt: skip
    slots, pool, x, y0 = _case(layout, num_slots, d_in, d_out, seed, row_len, rows, device)
    ranks = pool.ranks
    x, y0 = x.to(dtype), y0.to(dtype)
    mapping = TokenSlotMapping.build(slots, device)
    if layout == "prefill_gathered" or layout == "decode_repeats":
        assert mapping.gathered
    expected = y0.float().clone()  # .float() of a float32 tensor is the tensor itself
    low = pool.weights(dtype)  # the op's inputs; the reference gets them rounded the same way, in float32
    exact = LoraWeights.build(low.a.float(), low.b.float(), low.scales.float(), ranks, pool.offsets)
    apply_op(LORA_OPS["reference"], expected, x.float(), exact, slots)
    got = y0.clone()
    apply_op(LORA_OPS[op], got, x, low, slots)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)
    untouched = [t for t, s in enumerate(slots) if s == 0 or ranks[s] == 0]  # base slot, rank 0: to the bit
    assert untouched and torch.equal(got[untouched], y0[untouched])
    assert (got.float() - y0.float()).abs().max() > 0.1  # the adapters did something


# ---- CPU, Triton's interpreter (small shapes) -------------------------------------------------------------------
# Both kernel pairs on every layout and dtype; ``triton`` (which picks one of them per step) in float32.
INTERP_CASES = [(op, layout, dtype) for op in MODES[1:] for layout in LAYOUTS for dtype in TOLERANCES] + [
    ("triton", layout, torch.float32) for layout in LAYOUTS
]


@interpreter_only
@pytest.mark.parametrize(("op", "layout", "dtype"), INTERP_CASES, ids=str)
def test_interp_equals_reference(op: str, layout: str, dtype: torch.dtype) -> None:
    row_len = (30, 40) if op == "triton" else (3, 14)  # ``triton`` takes SGMV past 32 tokens of a slot
    _check(op, layout, dtype, "cpu", num_slots=6, d_in=200, d_out=150, seed=LAYOUTS.index(layout),
           row_len=row_len, rows=4)  # fmt: skip


@interpreter_only
def test_interp_ranks_change_between_steps() -> None:
    """The per-layer slot table copy and the step's plan are reused; a slot written or moved between calls is seen."""
    op = TritonOp("auto")
    slots, pool, x, y0 = _case("decode", 6, 64, 24, seed=7, row_len=(1, 1), rows=1)
    a, b = (
        torch.cat([pool.a[:-1], torch.zeros(40, 64), pool.a[-1:]]),
        torch.cat([pool.b[:-1], torch.zeros(40, 24), pool.b[-1:]]),
    )
    weights = LoraWeights.build(a, b, pool.scales, pool.ranks, pool.offsets)  # 40 free rows before the zero row
    free = a.shape[0] - 41
    meta = op.prepare(TokenSlotMapping.build(slots))
    for step in range(3):
        if step == 1:  # load an adapter of rank 32 into slot 6 (rank 0 so far), as BatchedLoraLinear.write_slot does
            a[free : free + 32], b[free : free + 32] = torch.randn(32, 64) / 8, torch.randn(32, 24) / 6
            weights.scales[6] = 1.0
            weights.set(6, free, 32, 1.0)
        if step == 2:  # move it down by 3 rows, as BatchedLoraLinear.move_slot does
            a[free - 3 : free + 29], b[free - 3 : free + 29] = a[free : free + 32].clone(), b[free : free + 32].clone()
            weights.set(6, free - 3, 32, 1.0)
        expected, got = y0.clone(), y0.clone()
        apply_op(LORA_OPS["reference"], expected, x, weights, slots)
        op.add(got, x, weights, meta)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@interpreter_only
def test_interp_wrapped_model_matches_reference_op() -> None:
    """Through BatchedLoraLinear on a tiny Llama: the Triton op gives the reference op's logits."""
    from loadtests.common.factories import build_tiny_model
    from server.model.lora_model import LoraModel

    logits = {}
    for op in ("reference", "triton"):
        model = LoraModel(build_tiny_model("llama", layers=1), num_slots=3, max_rank=16, op=op)
        g = torch.Generator().manual_seed(0)
        for layer in model.layers.values():
            for slot, r, offset in ((1, 4, 20), (2, 16, 0), (3, 8, 24)):  # at their true rank, out of slot order
                a = torch.randn(r, layer.in_features, generator=g)
                layer.write_slot(slot, a, torch.randn(layer.out_features, r, generator=g) * 0.1, 0.5 * slot, offset)
        ids = torch.randint(5, 300, (4, 6), generator=g)
        logits[op] = lora_logits(model, ids, row_mapping([1, 0, 3, 2], 6))
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(INTERPRETED or not TRITON_AVAILABLE, reason="this is the driver of the interpreter cases")
def test_interpreter_suite() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "interp_"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ---- CUDA (Llama-3-8B layer shapes) -----------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)], ids=str)
@pytest.mark.parametrize("op", MODES)
def test_cuda_equals_reference(op: str, shape: tuple[int, int], layout: str, dtype: torch.dtype) -> None:
    _check(op, layout, dtype, "cuda", num_slots=100, d_in=shape[0], d_out=shape[1], seed=LAYOUTS.index(layout),
           row_len=(16, 160), rows=4)  # fmt: skip


@needs_cuda
def test_cuda_auto_is_triton_once_validated() -> None:
    expected = "triton" if TRITON_VALIDATED_ON_GPU else "grouped"
    assert select_op("auto", torch.device("cuda")) is LORA_OPS[expected]
    assert select_op("triton", torch.device("cuda")) is LORA_OPS["triton"]  # by name, always


# ---- no kernel needed -------------------------------------------------------------------------------------------
def test_plan_picks_per_token_kernels_for_decode_and_segments_for_prefill() -> None:
    op = TritonOp("auto")
    decode = op.plan(TokenSlotMapping.build([0, 1, 2, 3, 4, 2]))
    assert decode.decode
    prefill = op.plan(TokenSlotMapping.build([1] * 40 + [0] * 3 + [2] * 5))
    assert not prefill.decode and prefill.block_m == 64
    assert prefill.blocks.tolist() == [1, 0, 40, 2, 43, 48] and prefill.num_blocks == 2
    assert op.plan(TokenSlotMapping.build([1] * 32 + [2])).decode  # up to 32 tokens of one slot
    gathered = op.plan(TokenSlotMapping.build([1] * 20 + [2] * 20 + [1] * 20 + [0]))
    assert not gathered.decode and gathered.gathered
    assert gathered.order.tolist() == [*range(20), *range(40, 60), *range(20, 40)]
    assert gathered.blocks.tolist() == [1, 0, 40, 2, 40, 60]
    long = TritonOp("sgmv").plan(TokenSlotMapping.build([3] * 150))
    assert long.blocks.tolist() == [3, 0, 64, 3, 64, 128, 3, 128, 150]
    assert TritonOp("bgmv").plan(TokenSlotMapping.build([3] * 150)).decode


def test_select_op_on_cuda_takes_triton_once_validated_on_a_gpu() -> None:
    expected = "triton" if TRITON_AVAILABLE and TRITON_VALIDATED_ON_GPU else "grouped"
    assert select_op("auto", torch.device("cuda")) is LORA_OPS[expected]
    assert select_op("auto", torch.device("cpu"), torch.float16) is LORA_OPS["grouped"]  # bfloat16: test_native_bf16
    if TRITON_AVAILABLE:
        assert {"triton", "triton_sgmv", "triton_bgmv"} <= set(LORA_OPS)


@needs_triton
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="checks the CPU error without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused() -> None:
    slots, _, _, _ = _case("decode", 3, 16, 16, seed=0, row_len=(1, 1), rows=1)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        LORA_OPS["triton"].prepare(TokenSlotMapping.build(slots))


@pytest.mark.skipif(INTERPRETED, reason="the CPU smoke test of the benchmark runs without the interpreter")
@pytest.mark.parametrize("micro", [False, True])
def test_bench_gpu_tiny_runs(micro: bool, tmp_path: Path) -> None:
    """loadtests/bench_gpu.py keeps working: its --tiny mode on CPU, a few tokens (the GPU run is by hand)."""
    from loadtests.bench_gpu import main

    out = tmp_path / "bench.json"
    argv = ["--tiny", "--device", "cpu", "--batch", "3", "--prompt", "4", "--new-tokens", "2", "--rounds", "1",
            "--calls", "1", "--json", str(out)] + (["--micro"] if micro else [])  # fmt: skip
    main(argv)
    results = json.loads(out.read_text())["results"]
    if micro:
        assert all(max(case["max_abs_err_vs_fp32_reference"].values()) < 1e-3 for case in results.values())
    else:
        figures = results["batches"]["3"]
        assert set(figures["tokens_per_second"]) == {"plain", "base", "1-adapter/grouped", "6-adapters/grouped"}
        assert figures["max_abs_first_logit_diff"]["base vs plain"] == 0
        assert figures["max_abs_first_logit_diff"]["6-adapters/grouped vs plain"] > 0
