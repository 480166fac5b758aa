"""How many KV blocks the pool gets: from ``--kv-cache-bytes``, or sized from the device when it is not set."""

import math

import torch

# CPU default when --kv-cache-bytes is not given: 2 GiB (46,000 positions of SmolLM2-135M in float32, 16,000 of
# an 8B Llama in bfloat16), and never more than every running row at full length needs. The pool is allocated
# untouched (zeros from calloc), so the resident memory grows with the blocks the traffic actually writes.
DEFAULT_CPU_KV_BYTES = 2 * 2**30
# CUDA default: this share of the memory free after the model and adapter slots are allocated; the rest is left
# for activations (logits at 128k-token vocabularies are large).
CUDA_FREE_SHARE = 0.8


def kv_pool_blocks(
    kv_cache_bytes: int | None, block_bytes: int, block_size: int, max_rows: int, max_seq_len: int, device: torch.device
) -> int:
    """Blocks of ``block_bytes`` (``block_size`` positions, every layer, K and V) that the pool holds.

    Raises ValueError when the pool cannot hold one sequence of ``max_seq_len`` positions: such a request would be
    accepted and then never fit."""
    per_sequence = math.ceil(max_seq_len / block_size)
    if kv_cache_bytes is not None:
        blocks = kv_cache_bytes // block_bytes
    else:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * CUDA_FREE_SHARE)
        else:
            budget = DEFAULT_CPU_KV_BYTES
        blocks = min(budget // block_bytes, max_rows * per_sequence)
    if blocks < per_sequence:
        raise ValueError(
            f"the KV cache holds {blocks} blocks of {block_size} positions ({block_bytes} bytes each) but one "
            f"sequence of the maximum length {max_seq_len} needs {per_sequence}: raise --kv-cache-bytes to at least "
            f"{per_sequence * block_bytes} or lower --max-seq-len"
        )
    return blocks
