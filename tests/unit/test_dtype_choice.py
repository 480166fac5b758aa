"""``--dtype auto``: bfloat16 on CUDA and on CPUs with hardware bfloat16 dot products, float32 on other CPUs."""

from pathlib import Path

import pytest
import torch

from server.model.dtype_choice import auto_dtype, read_cpu_flags
from server.model.loader import resolve_dtype

CPU = torch.device("cpu")
# Flag lines as /proc/cpuinfo prints them (shortened): this project's AVX2 EPYC, an AVX-512 CPU without bfloat16
# (Skylake-SP), Cooper Lake / Zen 4 (avx512_bf16), Sapphire Rapids (avx512_bf16 and AMX).
AVX2_EPYC = "fpu vme de pse sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c rdrand avx2 bmi2 sha_ni"
SKYLAKE = "sse4_2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"
ZEN4 = "avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_vbmi2"
SAPPHIRE_RAPIDS = "avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2_EPYC, torch.float32), (SKYLAKE, torch.float32), (ZEN4, torch.bfloat16),
     (SAPPHIRE_RAPIDS, torch.bfloat16), ("amx_bf16", torch.bfloat16), ("", torch.float32),
     ("avx512_bf16x", torch.float32)],  # a flag is a whole word, not a prefix
)  # fmt: skip
def test_auto_dtype_on_cpu_follows_the_bf16_flags(flags: str, expected: torch.dtype) -> None:
    dtype, reason = auto_dtype(CPU, flags.split())
    assert dtype == expected
    assert ("avx512_bf16" in reason or "amx_bf16" in reason) and reason.startswith("the CPU has")


def test_auto_dtype_on_cuda_is_bfloat16_whatever_the_cpu() -> None:
    assert auto_dtype(torch.device("cuda"), AVX2_EPYC.split())[0] == torch.bfloat16


def test_read_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {ZEN4}\n\nprocessor\t: 1\nflags\t\t: {ZEN4}\n")
    assert read_cpu_flags(cpuinfo) == frozenset(ZEN4.split())
    assert read_cpu_flags(tmp_path / "missing") == frozenset()
    cpuinfo.write_text("Features\t: fp asimd bf16\n")  # ARM lists Features, not flags: not taken
    assert read_cpu_flags(cpuinfo) == frozenset()


def test_resolve_dtype_auto_reads_this_machine_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="server.model.loader")
    expected, _ = auto_dtype(CPU, read_cpu_flags())
    assert resolve_dtype("auto", CPU) == expected
    assert "--dtype auto: " + str(expected).removeprefix("torch.") in caplog.text
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16  # an explicit dtype is taken as given
