"""The Triton paged decode kernel equals the torch reference: under Triton's interpreter on CPU, and on CUDA.

Same conventions as test_triton_ops.py: Triton picks interpreter or compiler when first imported, so the CPU cases
(``test_interp_*``) run in a ``TRITON_INTERPRET=1`` subprocess (``test_interpreter_suite``); the CUDA cases run in
this process and skip without a GPU; without triton everything skips.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.kernels.attention.reference import paged_decode_reference
from server.kernels.attention.select import select_decode
from server.kernels.attention.triton_decode import TRITON_AVAILABLE, paged_decode_triton
from server.kernels.triton.ops import interpreting
from tests.helpers.paths import REPO_ROOT

INTERPRETED = interpreting()
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}

interpreter_only = pytest.mark.skipif(
    not (TRITON_AVAILABLE and INTERPRETED), reason="runs in test_interpreter_suite's TRITON_INTERPRET=1 subprocess"
)
needs_cuda = pytest.mark.skipif(
    not (TRITON_AVAILABLE and torch.cuda.is_available()) or INTERPRETED, reason="needs triton and a CUDA GPU"
)


def _check(heads: int, kv_heads: int, dim: int, bs: int, contexts: list[int], dtype: torch.dtype, device: str) -> None:
    g = torch.Generator(device).manual_seed(heads + dim + bs + len(contexts))
    width = max(-(-c // bs) for c in contexts) + 1  # a padding column
    num_blocks = len(contexts) * width + 3
    k_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g, device=device).to(dtype)
    v_pool = torch.randn(num_blocks, bs, kv_heads, dim, generator=g, device=device).to(dtype)
    perm = torch.randperm(num_blocks, generator=g, device=device)
    tables = perm[: len(contexts) * width].view(len(contexts), width).to(torch.int32)  # shuffled, non-contiguous
    ctx = torch.tensor(contexts, dtype=torch.int32, device=device)
    q = torch.randn(len(contexts), heads, dim, generator=g, device=device).to(dtype)
    expected = torch.empty(q.shape, device=device)
    paged_decode_reference(expected, q.float(), k_pool.float(), v_pool.float(), tables, ctx, max(contexts), 0.125)
    got = torch.full_like(q, float("nan"))
    paged_decode_triton(got, q, k_pool, v_pool, tables, ctx, max(contexts), 0.125)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


SHAPES = [  # heads, kv_heads, dim, block size, contexts: GQA, MHA, MQA, partial blocks, odd sizes
    (9, 3, 64, 16, [40, 1, 16, 17]),
    (4, 4, 16, 4, [9, 3]),
    (6, 1, 20, 5, [12, 25]),
]


@interpreter_only
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_interp_equals_reference(shape: tuple[int, int, int, int, list[int]], dtype: torch.dtype) -> None:
    _check(*shape, dtype=dtype, device="cpu")


@pytest.mark.skipif(INTERPRETED or not TRITON_AVAILABLE, reason="this is the driver of the interpreter cases")
def test_interpreter_suite() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "interp_"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@needs_cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(
    "shape",
    [(32, 8, 128, 16, [1, 15, 16, 17, 300, 2048, 4000]), (9, 3, 64, 16, [300] * 64), (32, 32, 128, 32, [77, 500])],
    ids=str,
)
def test_cuda_equals_reference(shape: tuple[int, int, int, int, list[int]], dtype: torch.dtype) -> None:
    _check(*shape, dtype=dtype, device="cuda")


@needs_cuda
def test_cuda_selects_triton() -> None:
    assert select_decode(torch.device("cuda"), torch.bfloat16) == "triton"


@pytest.mark.skipif(INTERPRETED or not TRITON_AVAILABLE or torch.cuda.is_available(), reason="CPU, no interpreter")
def test_cpu_tensors_without_interpreter_are_refused() -> None:
    q = torch.zeros(1, 2, 16)
    pool = torch.zeros(2, 4, 2, 16)
    tables, ctx = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        paged_decode_triton(torch.empty_like(q), q, pool, pool, tables, ctx, 1, 1.0)
