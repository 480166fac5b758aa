"""What ``--dtype auto`` means: the fastest compute dtype this device runs well, and why.

- CUDA: bfloat16 (tensor cores; unchanged from before issue 19).
- CPU with ``avx512_bf16`` or ``amx_bf16`` (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later):
  bfloat16. There oneDNN's bfloat16 GEMMs use hardware dot products (2.2-2.7x float32 at decode shapes, up to 5.4x at
  the LM head, measured in issue 19) and the C LoRA kernel's AVX512-BF16 path is compiled in.
- Any other CPU: float32. Without those instructions bfloat16 is only a storage format: every product widens it to
  float32 first, so it halves memory but is slower (2-6x per GEMM measured on an AVX2 EPYC) and costs accuracy
  (docs/benchmarks.md, "bfloat16 on CPU (issue 19)").

The flags are read from ``/proc/cpuinfo`` (Linux); where it is missing (macOS, Windows), the CPU counts as having
neither flag. ARM's ``bf16`` feature is not taken: oneDNN's ARM kernels were not measured.
"""

from collections.abc import Iterable
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (empty where the file is missing)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def auto_dtype(device: torch.device, cpu_flags: Iterable[str]) -> tuple[torch.dtype, str]:
    """The dtype ``--dtype auto`` resolves to on ``device`` and the reason, for the startup log.

    cpu_flags: the CPU's feature flags (``read_cpu_flags()``); only read for a CPU device.
    """
    if device.type == "cuda":
        return torch.bfloat16, "CUDA device"
    present = sorted(set(BF16_CPU_FLAGS) & set(cpu_flags))
    if present:
        return torch.bfloat16, f"the CPU has {' and '.join(present)} (hardware bfloat16 dot products)"
    return torch.float32, f"the CPU has neither {' nor '.join(BF16_CPU_FLAGS)} (bfloat16 would be no faster)"
