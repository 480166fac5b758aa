"""The per-step LoRA context every wrapped layer reads, so model ``forward`` signatures stay untouched (the
nano-vllm context pattern, one context per model instance)."""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DoraTokens:
    """The step's tokens on DoRA adapters, and where each one's rescaling sits in the adapter pool: the pool row
    holding ``g - 1`` of its adapter, the same row in every wrapped layer (the slot cache places an adapter at one
    offset everywhere). Long runs of tokens are rescaled as slices, one op each; many short runs (decode tokens of
    many DoRA adapters) as one gather, a few ops whatever their number.

    spans:  host (start, end, row) runs of tokens start..end-1 on the adapter whose ``g - 1`` is in pool row ``row``
    tokens: [D] int64 on the device, the tokens of the other runs (None when there are none)
    rows:   [D] int64 on the device, the pool row of each of those tokens
    slots:  the DoRA slots of the step (host), so a layer none of them adapts skips the rescale
    """

    spans: tuple[tuple[int, int, int], ...]
    tokens: torch.Tensor | None
    rows: torch.Tensor | None
    slots: frozenset[int]


@dataclass(frozen=True)
class LoraStep:
    """One forward pass's LoRA input: how many flattened tokens it covers, the active op's metadata for it
    (``LoraOp.prepare``, built once per step and read by every wrapped layer), and its DoRA tokens (None when no
    token is on a DoRA adapter: such steps pay nothing for DoRA)."""

    num_tokens: int
    meta: Any
    dora: DoraTokens | None = None


class LoraContext:
    """The mutable per-model holder that every wrapped layer reads; the caller sets a step before each forward.

    No step means "every token uses the base model", so the wrapped model behaves like the plain one.
    """

    def __init__(self) -> None:
        self.step: LoraStep | None = None

    def set(self, step: LoraStep | None) -> None:
        self.step = step

    def clear(self) -> None:
        self.step = None
