"""Whole-batch forward passes of a ``LoraModel`` with one slot per row, for tests and benchmarks (the server's own
path is the model runner, which flattens chunks of many sequences)."""

from collections.abc import Sequence

import torch

from server.kernels.mapping import TokenSlotMapping
from server.model.lora_model import LoraModel


def row_mapping(row_slots: Sequence[int], row_length: int, device: torch.device | str = "cpu") -> TokenSlotMapping:
    """Mapping for ``len(row_slots)`` rows of ``row_length`` tokens, flattened batch-major; row i on row_slots[i]."""
    return TokenSlotMapping.build([slot for slot in row_slots for _ in range(row_length)], device)


@torch.inference_mode()
def lora_logits(model: LoraModel, input_ids: torch.Tensor, mapping: TokenSlotMapping | None) -> torch.Tensor:
    """input_ids [B, L] -> logits [B, L, vocab]; token (b, l) is mapping entry b * L + l (None: base model)."""
    with model.using(model.prepare(mapping)):
        return model.model(input_ids=input_ids, use_cache=False).logits
