"""Per-step token -> slot mapping: which adapter slot each token of the flattened batch uses.

Built once per forward pass on the host from plain ints, then read by every wrapped layer through ``LoraContext``,
so model ``forward`` signatures stay untouched (the nano-vllm context pattern, one context per model instance).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.lora.slots import BASE_SLOT

# The padded layout pays for (slots in window) x (largest group) rows; use it while that is at most this many times
# the adapter tokens, and only when there are enough groups for per-group calls to cost more than the padding.
# Large groups (prompt chunks) run best as plain per-slot matmuls, so groups of more than MAX_PADDED_ROWS tokens
# never take the padded layout.
PADDING_BUDGET = 2
MIN_GROUPS_FOR_PADDING = 4
MAX_PADDED_ROWS = 8


@dataclass(frozen=True)
class PaddedSlots:
    """Adapter tokens laid out as a [W, M] grid: slot window ``lo..hi`` (W = hi - lo) by ``rows`` (M) per slot.

    Made for decode steps, where many slots have one or two tokens each: the LoRA add then takes two ``bmm`` calls
    over the window instead of two matmuls per slot.
    run:       (start, end) when the adapter tokens are exactly ``x[start:end]`` in grid order (one token per slot
               of the window, in slot order: the usual decode step, since the runner sorts tokens by slot); the
               grid is then a view of ``x`` and nothing is gathered or scattered. None otherwise.
    gather:    [W*M] int64  token read into each grid cell; padding cells read some adapter token (their products
               are never added back). Empty when ``run`` is set.
    tokens:    [N] int64  flattened-token index of each adapter token
    cells:     [N] int64  its grid cell, ``(slot - lo) * M + rank among its slot's tokens``
    """

    lo: int
    hi: int
    rows: int
    run: tuple[int, int] | None
    gather: torch.Tensor
    tokens: torch.Tensor
    cells: torch.Tensor


@dataclass(frozen=True)
class TokenSlotMapping:
    """Token -> slot assignment for one forward pass over ``T`` flattened tokens (batch-major, then position).

    token_slots: [T] int64 on the model device, the slot of each token (BASE_SLOT = no adapter).
    segments:    host-side (slot, start, end) for each adapter slot present, base tokens excluded.
    gathered:    False when every adapter slot's tokens already form one run of consecutive tokens; segments then
                 index the tokens directly. True otherwise; segments then index ``x[order]``.
    order:       [N] int64 on the device, adapter-token positions sorted by slot (stable); empty unless gathered.
    padded:      the [slots, rows] layout when it is cheaper than per-slot calls (many small groups), else None.
    """

    token_slots: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    gathered: bool
    order: torch.Tensor
    padded: PaddedSlots | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def slots_in_use(self) -> frozenset[int]:
        return frozenset(slot for slot, _, _ in self.segments)

    @classmethod
    def build(
        cls, slots: Sequence[int], device: torch.device | str = "cpu", allow_padded: bool = True
    ) -> "TokenSlotMapping":
        """Mapping for tokens whose slots are ``slots`` (host ints, one per flattened token)."""
        padded = _padded(slots, device) if allow_padded else None
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
            return cls(
                token_slots, tuple(adapter_runs), False, torch.empty(0, dtype=torch.int64, device=device), padded
            )
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
        order_t = torch.tensor(order, dtype=torch.int64, device=device)
        return cls(token_slots, tuple(segments), True, order_t, padded)

    @classmethod
    def for_rows(cls, row_slots: Sequence[int], row_lengths: Sequence[int], device: torch.device | str = "cpu"):
        """Mapping for a batch whose row ``i`` has ``row_lengths[i]`` tokens, all using slot ``row_slots[i]``."""
        if len(row_slots) != len(row_lengths):
            raise ValueError("row_slots and row_lengths must have the same length")
        flat = [slot for slot, n in zip(row_slots, row_lengths, strict=True) for _ in range(n)]
        return cls.build(flat, device)


def _padded(slots: Sequence[int], device: torch.device | str) -> PaddedSlots | None:
    counts: dict[int, int] = {}
    tokens: list[int] = []
    slot_of: list[int] = []
    row_of: list[int] = []
    for t, slot in enumerate(slots):
        if slot != BASE_SLOT:
            row_of.append(counts.get(slot, 0))
            counts[slot] = row_of[-1] + 1
            tokens.append(t)
            slot_of.append(slot)
    if len(counts) < MIN_GROUPS_FOR_PADDING:
        return None
    lo, hi, rows = min(counts), max(counts) + 1, max(counts.values())
    if rows > MAX_PADDED_ROWS or (hi - lo) * rows > PADDING_BUDGET * len(tokens):
        return None

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    cells = [(s - lo) * rows + r for s, r in zip(slot_of, row_of, strict=True)]
    n = len(tokens)
    if rows == 1 and n == hi - lo and cells == list(range(n)) and tokens == list(range(tokens[0], tokens[0] + n)):
        empty = tensor([])
        return PaddedSlots(lo, hi, rows, (tokens[0], tokens[0] + n), empty, tensor(tokens), tensor(cells))
    gather = [tokens[0]] * ((hi - lo) * rows)
    for t, cell in zip(tokens, cells, strict=True):
        gather[cell] = t
    return PaddedSlots(lo, hi, rows, None, tensor(gather), tensor(tokens), tensor(cells))


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
