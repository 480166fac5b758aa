"""The paged KV cache: one pool of fixed-size blocks preallocated at startup, handed out to sequences by block id.

The block manager (torch-free) decides which blocks a sequence owns; a sequence's ``block_table`` lists them in
position order, so position ``p`` lives in block ``block_table[p // block_size]`` at offset ``p % block_size``.
Its *slot index* is ``block_table[p // block_size] * block_size + p % block_size``.
"""

from collections.abc import Sequence

import torch
from transformers import PretrainedConfig


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a Hugging Face decoder config (Llama-family field names)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


class PagedKVCache:
    """K and V of ``num_blocks`` blocks of ``block_size`` positions in every layer.

    k, v: [layers, num_blocks, block_size, kv_heads, head_dim]. Within a block, positions are outermost: one
    position's K (all heads) is one contiguous run, so ``write`` is a single ``index_copy_`` on the flat
    [num_blocks * block_size, kv_heads, head_dim] view of a layer, a prefix gather copies whole blocks, and the
    CPU decode kernel reads each key as ``head_dim`` contiguous floats (whole cache lines). The pool never grows.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of one position, got {num_blocks}x{block_size}")
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        # On the CPU the pool is left unwritten (``empty``: a large allocation is fresh pages from the OS), so
        # resident memory grows with the blocks the traffic writes; ``zeros`` would touch every page at startup.
        # Safe because no position is read before it is written: attention reads a sequence's first ``context``
        # positions only, and the kernels mask (or never load) a block's positions past the context.
        alloc = torch.empty if torch.device(device).type == "cpu" else torch.zeros
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def block_bytes(config: PretrainedConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over all layers, K and V (what a memory budget is divided by)."""
        layers, kv_heads, head_dim = kv_shape(config)
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def for_model(
        config: PretrainedConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> "PagedKVCache":
        """Size the pool from a Hugging Face decoder config."""
        layers, kv_heads, head_dim = kv_shape(config)
        return PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's pools: k, v [num_blocks, block_size, kv_heads, head_dim] (no copy)."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, slot_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k_pool[layer].flat[slot_index[t]] = k[t] (and v) for every new token t.

        slot_index: [T] int64 (block * block_size + offset)    k, v: [T, kv_heads, head_dim]
        """
        flat = (-1, self.kv_heads, self.head_dim)
        self.k[layer].view(flat).index_copy_(0, slot_index, k)
        self.v[layer].view(flat).index_copy_(0, slot_index, v)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Block ``dst`` = block ``src`` in every layer, for each (src, dst) (a forked sequence's partial last block).

        All sources are read before any destination is written."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
