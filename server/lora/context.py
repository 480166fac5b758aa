"""The per-step LoRA context every wrapped layer reads, so model ``forward`` signatures stay untouched (the
nano-vllm context pattern, one context per model instance)."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoraStep:
    """One forward pass's LoRA input: how many flattened tokens it covers, and the active op's metadata for it
    (``LoraOp.prepare``, built once per step and read by every wrapped layer)."""

    num_tokens: int
    meta: Any


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
