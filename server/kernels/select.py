"""The registry of LoRA ops and ``select_op``, which picks one once at startup.

- ``reference`` (``server.kernels.reference``): the yardstick every fast op is tested against.
- ``grouped`` (``server.kernels.grouped``): torch matmuls per run of one adapter's tokens, short runs on a grid.
- ``native`` (``server.kernels.native.ops``, CPU float32 or bfloat16): a C kernel that does every run of a layer in
  one call; ``auto`` takes it on CPU when the kernel of the model's dtype builds here and passes its self-check, else
  ``grouped``.
- ``triton`` (``server.kernels.triton.ops``, registered when triton is installed): Triton kernels, a segmented SGMV
  pair for prefill and a gathered per-token BGMV pair for decode, picked per step; ``triton_sgmv`` and
  ``triton_bgmv`` force one pair. Selectable by name; ``auto`` on CUDA takes ``grouped`` until the kernels have
  passed their CUDA tests on a real GPU (``TRITON_VALIDATED_ON_GPU``).

A new op is a class with ``prepare`` and ``add`` (``server.kernels.protocol.LoraOp``), registered here.
"""

from typing import Any

import torch

from server.kernels.grouped import GroupedOp
from server.kernels.native import ops as native_ops
from server.kernels.protocol import LoraOp
from server.kernels.reference import ReferenceOp
from server.kernels.triton import ops as triton_ops

# The Triton kernels have passed their tests on CPU under Triton's interpreter only; no GPU has run them yet. Set
# this to True once ``make gpu-check`` has passed on a real GPU (and put its summary in docs/benchmarks.md): until
# then ``auto`` on CUDA takes the torch ``grouped`` op.
TRITON_VALIDATED_ON_GPU = False

LORA_OPS: dict[str, LoraOp[Any]] = {
    "reference": ReferenceOp(),
    "grouped": GroupedOp(),
    "native": native_ops.NativeOp(),
}
if triton_ops.TRITON_AVAILABLE:  # triton itself is imported on the op's first use, not here
    LORA_OPS.update(triton_ops.OPS)


def select_op(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LoraOp[Any]:
    """The LoRA op to use, chosen once at startup. ``auto`` picks the fastest op proven correct on the device."""
    native_fits = device.type == "cpu" and dtype in native_ops.NATIVE_DTYPES
    if name == "auto":
        # On CUDA the Triton kernels once validated on a GPU (Triton has no CPU backend, only a slow interpreter);
        # on CPU the C kernel (float32 or bfloat16) where it builds; else the grouped torch op.
        if device.type == "cuda":
            triton_ready = TRITON_VALIDATED_ON_GPU and "triton" in LORA_OPS and triton_ops.triton_usable()
            name = "triton" if triton_ready else "grouped"
        else:
            name = "native" if native_fits and native_ops.native_usable(dtype) else "grouped"
    elif name == "native" and not (native_fits and native_ops.native_usable(dtype)):
        raise ValueError("the native LoRA op needs float32 or bfloat16 on the CPU and a C compiler (see the log)")
    elif name.startswith("triton") and device.type != "cuda" and not triton_ops.interpreting():
        raise ValueError(f"the {name} LoRA op needs a CUDA device")
    try:
        return LORA_OPS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA op {name!r}; choose one of {sorted(LORA_OPS)} or 'auto'") from None
