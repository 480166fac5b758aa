"""The bfloat16 kernel's AVX512-BF16 path (``_mm512_dpbf16_ps``, masked tail loads, lane reduction), tested on any
x86-64 CPU: compiled with ``-D__AVX512BF16__`` against ``dpbf16_emulation/immintrin.h``, which emulates those few
intrinsics in plain C, and run through the op on the same cases as the widening build. This checks the path's
logic (blocking, the 32-element steps and the masked tail, the reduction, scales); the instructions themselves run
only on a CPU that has them, where ``test_native_bf16.py`` exercises the real build."""

import ctypes
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.kernels.native import build as native_build
from server.kernels.native import ops as native_ops
from server.kernels.native.build import BF16_SOURCE, NativeBf16Library, declare_runs_signature, find_compiler
from tests.unit.test_native_bf16 import assert_within_bf16, bf16_step

EMULATION = Path(__file__).parent / "dpbf16_emulation"


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> NativeBf16Library:
    compiler = find_compiler()
    if compiler is None or native_build.shared_library() is None:
        pytest.skip("no C compiler on this machine")
    target = tmp_path_factory.mktemp("dpbf16") / "lora_runs_bf16_emulated.so"
    flags = ["-O2", "-std=gnu11", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi",
             "-D__AVX512BF16__", f"-I{EMULATION}"]  # fmt: skip
    result = subprocess.run([compiler, *flags, "-o", str(target), str(BF16_SOURCE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cdll = ctypes.CDLL(str(target))
    declare_runs_signature(cdll.lora_add_runs_bf16)
    return NativeBf16Library(target, tuple(flags), False, bool(cdll.lora_bf16_uses_dpbf16()), cdll.lora_add_runs_bf16)


@pytest.fixture
def dpbf16_path(emulated: NativeBf16Library, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    assert emulated.uses_dpbf16
    monkeypatch.setattr(native_ops, "shared_bf16_library", lambda: emulated)
    yield


@pytest.mark.usefixtures("dpbf16_path")
@pytest.mark.parametrize(
    ("d_in", "d_out", "max_rank", "tokens"),
    [(64, 96, 16, 40), (37, 45, 8, 23), (576, 192, 16, 33), (16, 1536, 64, 9), (200, 31, 5, 300), (8, 8, 1, 1),
     (32, 40, 4, 7), (33, 40, 4, 7)],  # exactly one dpbf16 step; one and a 1-element masked tail
)  # fmt: skip
@pytest.mark.parametrize("mixed", [False, True], ids=["ranks0-R", "ranks4-64"])
def test_dpbf16_path_equals_reference(d_in: int, d_out: int, max_rank: int, tokens: int, mixed: bool) -> None:
    got, expected, y0, _ = bf16_step(d_in + d_out + tokens, d_in, d_out, max_rank, tokens, False, mixed)
    assert_within_bf16(got, expected, y0)


@pytest.mark.usefixtures("dpbf16_path")
def test_dpbf16_path_passes_the_self_check() -> None:
    native_ops.native_usable.cache_clear()
    try:
        assert native_ops.native_usable(torch.bfloat16)
    finally:
        native_ops.native_usable.cache_clear()
