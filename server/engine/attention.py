"""Attention over the paged KV cache, plugged into Hugging Face models through their attention registry.

The model runs on a flattened batch: ``input_ids`` [1, T] holds the new tokens of every scheduled sequence (single
decode tokens first, then prompt chunks) and ``position_ids`` [1, T] their positions. The model's own layers
compute q/k/v, RoPE and the projections; this function only writes the new K/V into the block pool and attends each
token to its own sequence's context, read through the sequence's block table. Per-step metadata reaches it through
an ``AttentionContext`` attached to every attention module, so no model signature changes.

- Decode (one new token): a paged decode kernel (``server.kernels.attention``: C on the CPU, Triton on CUDA, torch
  elsewhere) reads the keys straight from the pool.
- A prompt chunk whose whole context is new this step attends to its fresh keys (plain causal SDPA); a later chunk,
  or one after a prefix-cache hit, gathers its context's blocks from the pool (itself included, written first).
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from server.engine.kv_cache import PagedKVCache
from server.kernels.attention.reference import gather_blocks
from server.kernels.attention.select import DECODE_KERNELS, select_decode

ATTN_IMPLEMENTATION = "lora_server_kv"


@dataclass(frozen=True)
class PrefillSegment:
    """Tokens ``start..end`` of the flattened batch: one sequence's chunk, ending at context length ``context``.

    blocks: [>= ceil(context / block_size)] int64, the sequence's block table, or None when the whole context is new
    in this step (``context == end - start``: attend to the fresh keys, read nothing from the pool).
    """

    start: int
    end: int
    context: int
    blocks: torch.Tensor | None


@dataclass(frozen=True)
class AttentionMetadata:
    """What one forward pass needs to place and read K/V.

    slot_index:   [T] int64     pool slot (block * block_size + offset) of every new token
    prefills:     host-side segments of the sequences with more than one new token
    num_decodes:  the first ``num_decodes`` tokens are single-token sequences (decode), in this order:
    block_tables: [num_decodes, max_blocks] int32, each one's block table, padded with block 0
    context_lens: [num_decodes] int32, each one's context length (its own token included)
    max_context:  the largest of ``context_lens`` (a host int: no device sync to size the torch path)
    """

    slot_index: torch.Tensor
    prefills: tuple[PrefillSegment, ...]
    num_decodes: int
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    max_context: int


class AttentionContext:
    """Shared by the runner and every attention module of one model: the pool, the decode kernel (chosen once),
    and the current step's metadata. ``max_len`` is the longest sequence the runner accepts."""

    def __init__(self, cache: PagedKVCache, max_len: int, decode_kernel: str | None = None) -> None:
        self.cache = cache
        self.max_len = max_len
        self.decode_kernel = decode_kernel or select_decode(cache.k.device, cache.k.dtype)
        self.decode = DECODE_KERNELS[self.decode_kernel]
        self.metadata: AttentionMetadata | None = None


def install(model: PreTrainedModel, context: AttentionContext) -> None:
    """Route every attention module of ``model`` through ``cached_attention`` reading ``context``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, cached_attention)
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    for config in (getattr(model.config, "text_config", None),):
        if config is not None:
            config._attn_implementation = ATTN_IMPLEMENTATION
    found = 0
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
            # torch's stubs type Module attributes as Tensor | Module; at run time any value can be set.
            module.lora_server_attention = context  # type: ignore[assignment]
            found += 1
    if found != model.config.num_hidden_layers:
        raise ValueError(f"found {found} attention modules for {model.config.num_hidden_layers} layers")


def sliding_window_of(config: object) -> int | None:
    """The attention window a model applies, or None when it attends to the whole sequence."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def cached_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KV, T, D] (RoPE applied) -> output [1, T, H, D].

    out[t] = softmax(q[t] . K_s[:ctx_t] * scaling) V_s[:ctx_t] for t's sequence s, whose keys K_s are read through
    its block table, after writing every new token's k/v into the pool.
    """
    context, layer = module.lora_server_attention, module.layer_idx
    if not isinstance(context, AttentionContext) or not isinstance(layer, int):
        raise RuntimeError("cached attention ran on a module that install() did not set up")
    meta = context.metadata
    if meta is None:
        raise RuntimeError("cached attention ran without step metadata")
    cache = context.cache
    if sliding_window is not None and sliding_window < context.max_len:  # checked at startup by sliding_window_of
        raise NotImplementedError("sliding-window attention shorter than the KV cache is not supported")
    cache.write(layer, meta.slot_index, key[0].transpose(0, 1), value[0].transpose(0, 1))  # [T, KV, D]
    k_pool, v_pool = cache.layer(layer)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)  # [T, H, D]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)

    for seg in meta.prefills:
        qs = query[:, :, seg.start : seg.end]  # [1, H, m, D]
        if seg.blocks is None:  # whole context in this step: attend to the fresh keys, plain causal
            ks = key[:, :, seg.start : seg.end]
            vs = value[:, :, seg.start : seg.end]
            res = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:  # a later chunk: its context from the pool (itself included), causal with an offset
            ks = gather_blocks(k_pool, seg.blocks, seg.context).transpose(0, 1).unsqueeze(0)  # [1, KV, ctx, D]
            vs = gather_blocks(v_pool, seg.blocks, seg.context).transpose(0, 1).unsqueeze(0)
            m = seg.end - seg.start
            qpos = torch.arange(seg.context - m, seg.context, device=q.device)
            mask = torch.arange(seg.context, device=q.device).unsqueeze(0) <= qpos.unsqueeze(1)  # [m, ctx]
            res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[seg.start : seg.end] = res[0].transpose(0, 1)

    n = meta.num_decodes
    if n:
        context.decode(
            out[:n], q[:n].contiguous(), k_pool, v_pool, meta.block_tables, meta.context_lens, meta.max_context, scale
        )
    return out.unsqueeze(0), None
