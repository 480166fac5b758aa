"""The KV cache: preallocated once at startup, one row per running sequence, written by position."""

import torch
from transformers import PretrainedConfig


class KVCache:
    """K and V for ``max_rows`` sequences of up to ``max_len`` tokens in every layer.

    k, v: [layers, max_rows, kv_heads, max_len, head_dim]. A running sequence owns one row for its whole life;
    rows are handed out by the scheduler (torch-free) and the cache never reallocates.
    """

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, max_rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_rows = max_rows
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """cache[layer, rows[t], :, positions[t]] = k[t] (and v) for every new token t.

        rows, positions: [T] int64    k, v: [T, kv_heads, head_dim]
        """
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """cache[:, dst, :, :length] = cache[:, src, :, :length] in every layer (a forked sequence's shared prompt)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    @staticmethod
    def for_model(
        config: PretrainedConfig, max_rows: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> "KVCache":
        """Size the cache from a Hugging Face decoder config (Llama-family field names)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return KVCache(config.num_hidden_layers, max_rows, max_len, kv_heads, head_dim, dtype, device)
