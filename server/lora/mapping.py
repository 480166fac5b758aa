"""Per-step token -> slot mapping: which adapter slot each token of the flattened batch uses.

Built once per forward pass on the host from plain ints, then read by every wrapped layer through ``LoraContext``,
so model ``forward`` signatures stay untouched (the nano-vllm context pattern, one context per model instance).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.lora.slots import BASE_SLOT


@dataclass(frozen=True)
class TokenSlotMapping:
    """Token -> slot assignment for one forward pass over ``T`` flattened tokens (batch-major, then position).

    token_slots: [T] int64 on the model device, the slot of each token (BASE_SLOT = no adapter).
    segments:    host-side (slot, start, end) for each adapter slot present, base tokens excluded.
    gathered:    False when every adapter slot's tokens already form one run of consecutive tokens; segments then
                 index the tokens directly. True otherwise; segments then index ``x[order]``.
    order:       [N] int64 on the device, adapter-token positions sorted by slot (stable); empty unless gathered.
    """

    token_slots: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    gathered: bool
    order: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def slots_in_use(self) -> frozenset[int]:
        return frozenset(slot for slot, _, _ in self.segments)

    @classmethod
    def build(cls, slots: Sequence[int], device: torch.device | str = "cpu") -> "TokenSlotMapping":
        """Mapping for tokens whose slots are ``slots`` (host ints, one per flattened token)."""
        runs: list[tuple[int, int, int]] = []
        for t, slot in enumerate(slots):
            if runs and runs[-1][0] == slot and runs[-1][2] == t:
                runs[-1] = (slot, runs[-1][1], t + 1)
            else:
                runs.append((slot, t, t + 1))
        adapter_runs = [run for run in runs if run[0] != BASE_SLOT]
        distinct = {slot for slot, _, _ in adapter_runs}
        token_slots = torch.tensor(list(slots), dtype=torch.int64, device=device)
        if len(adapter_runs) == len(distinct):
            return cls(token_slots, tuple(adapter_runs), False, torch.empty(0, dtype=torch.int64, device=device))
        by_slot: dict[int, list[int]] = {}
        for t, slot in enumerate(slots):
            if slot != BASE_SLOT:
                by_slot.setdefault(slot, []).append(t)
        order: list[int] = []
        segments: list[tuple[int, int, int]] = []
        for slot in sorted(by_slot):
            positions = by_slot[slot]
            segments.append((slot, len(order), len(order) + len(positions)))
            order.extend(positions)
        return cls(token_slots, tuple(segments), True, torch.tensor(order, dtype=torch.int64, device=device))

    @classmethod
    def for_rows(cls, row_slots: Sequence[int], row_lengths: Sequence[int], device: torch.device | str = "cpu"):
        """Mapping for a batch whose row ``i`` has ``row_lengths[i]`` tokens, all using slot ``row_slots[i]``."""
        if len(row_slots) != len(row_lengths):
            raise ValueError("row_slots and row_lengths must have the same length")
        flat = [slot for slot, n in zip(row_slots, row_lengths, strict=True) for _ in range(n)]
        return cls.build(flat, device)


class LoraContext:
    """The mutable per-model holder that every wrapped layer reads; the caller sets a mapping before each forward.

    A missing mapping means "every token uses the base model", so the wrapped model behaves like the plain one.
    """

    def __init__(self) -> None:
        self.mapping: TokenSlotMapping | None = None

    def set(self, mapping: TokenSlotMapping | None) -> None:
        self.mapping = mapping

    def clear(self) -> None:
        self.mapping = None
