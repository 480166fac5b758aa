"""The one adapter-index convention used everywhere (layers, ops, mapping, slot cache).

Stacked LoRA buffers hold ``num_slots + 1`` entries. Entry ``BASE_SLOT`` (0) is permanently zero with scale 0 and
means "no adapter": a token mapped to it gets the frozen base model's output. Adapter slots are ``1..num_slots``.
"""

BASE_SLOT = 0
"""Slot index of the base model (no adapter). Never written, never evicted."""


def adapter_slots(num_slots: int) -> range:
    """The slot indices that can hold an adapter: ``1..num_slots``."""
    return range(BASE_SLOT + 1, BASE_SLOT + 1 + num_slots)
