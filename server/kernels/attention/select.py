"""The paged decode-attention kernel for a device and dtype, chosen once at startup.

All kernels share one signature (``DecodeKernel``) and the semantics of ``reference.paged_decode_reference``:
the C kernel on the CPU in float32 or bfloat16 (when it builds and passes its self-check in that dtype), Triton on
CUDA (when it imports), the torch gather path everywhere else (float16 on the CPU included).
"""

from typing import Protocol

import torch

from server.kernels.attention.native import native_decode_usable, paged_decode_native
from server.kernels.attention.reference import paged_decode_reference
from server.kernels.attention.triton_decode import TRITON_AVAILABLE, paged_decode_triton, triton_decode_usable


class DecodeKernel(Protocol):
    def __call__(
        self,
        out: torch.Tensor,  # [n, H, D], written
        q: torch.Tensor,  # [n, H, D]
        k_pool: torch.Tensor,  # [num_blocks, block_size, KV, D], one layer
        v_pool: torch.Tensor,
        block_tables: torch.Tensor,  # [n, max_blocks] int32
        context_lens: torch.Tensor,  # [n] int32
        max_context: int,
        scale: float,
    ) -> None: ...


DECODE_KERNELS: dict[str, DecodeKernel] = {
    "torch": paged_decode_reference,
    "native": paged_decode_native,
    "triton": paged_decode_triton,
}


def select_decode(device: torch.device, dtype: torch.dtype) -> str:
    """The name (a key of ``DECODE_KERNELS``) of the fastest usable decode kernel for this device and dtype."""
    if device.type == "cpu" and native_decode_usable(dtype):  # False for a dtype the C kernel does not serve
        return "native"
    if device.type == "cuda" and TRITON_AVAILABLE and triton_decode_usable():
        return "triton"
    return "torch"
