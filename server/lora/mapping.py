"""Per-step token -> slot mapping: which adapter slot each token of the flattened batch uses.

Built once per forward pass on the host from plain ints, then read by every wrapped layer through ``LoraContext``,
so model ``forward`` signatures stay untouched (the nano-vllm context pattern, one context per model instance).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.lora.slots import BASE_SLOT

# Runs of consecutive tokens on one adapter (a prompt chunk, or the decode tokens of one adapter) are added with
# two dense matmuls each. Once a step has at least MIN_SHORT_RUNS short runs (decode with many adapters), those are
# instead laid out as a [slots, rows] grid and added with two ``bmm`` calls, a fixed number of calls however many
# adapters the step mixes, for a copy of their weights. Measured on a 2-core CPU with SmolLM2-135M (32 decode rows):
# the grid costs about what the per-run matmuls cost at 12 adapters and less past that (docs/benchmarks.md).
SHORT_RUN_TOKENS = 8
MIN_SHORT_RUNS = 12


@dataclass(frozen=True)
class ShortRuns:
    """Adapter tokens in short runs, laid out as a [D slots, M rows] grid and added with two ``bmm`` calls.

    slots:  [D] int64   the distinct slots of these tokens (ascending); ``distinct`` is the same on the host
    rows:   M, the most tokens any of these slots has (padding rows repeat one of the slot's tokens)
    gather: [D*M] int64 token read into each grid cell; empty when ``span`` is set
    tokens: [n] int64   flattened-token index of each real token; cells: [n] int64 its grid cell
    span:   (start, end) when the tokens are exactly ``x[start:end]`` in grid order (one token per slot, in slot
            order: the usual decode step), so the grid is a view of ``x`` and the result a slice of ``y``
    """

    slots: torch.Tensor
    distinct: tuple[int, ...]
    rows: int
    gather: torch.Tensor
    tokens: torch.Tensor
    cells: torch.Tensor
    span: tuple[int, int] | None


@dataclass(frozen=True)
class TokenSlotMapping:
    """Token -> slot assignment for one forward pass over ``T`` flattened tokens (batch-major, then position).

    token_slots: [T] int64 on the model device, the slot of each token (BASE_SLOT = no adapter).
    segments:    host-side (slot, start, end) for each adapter slot present, base tokens excluded.
    gathered:    False when every adapter slot's tokens already form one run of consecutive tokens; segments then
                 index the tokens directly. True otherwise; segments then index ``x[order]``.
    order:       [N] int64 on the device, adapter-token positions sorted by slot (stable); empty unless gathered.
    runs:        host-side (slot, start, end) runs of consecutive tokens on one adapter, added by dense matmuls
                 (every run when ``short`` is None, else the long ones).
    short:       the tokens of the short runs, on a slot grid; None when there are too few short runs to pay.
    run_table:   [n, 3] int32 on the host, every adapter run (short ones too) as (slot, start, end).
    ``segments``/``gathered``/``order`` serve the Triton kernels, ``runs``/``short`` the torch op, ``run_table``
    the native CPU kernel.
    """

    token_slots: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    gathered: bool
    order: torch.Tensor
    runs: tuple[tuple[int, int, int], ...] = ()
    short: ShortRuns | None = None
    run_table: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def slots_in_use(self) -> frozenset[int]:
        return frozenset(slot for slot, _, _ in self.segments)

    @classmethod
    def build(
        cls, slots: Sequence[int], device: torch.device | str = "cpu", allow_short: bool = True
    ) -> "TokenSlotMapping":
        """Mapping for tokens whose slots are ``slots`` (host ints, one per flattened token)."""
        runs: list[tuple[int, int, int]] = []
        for t, slot in enumerate(slots):
            if runs and runs[-1][0] == slot and runs[-1][2] == t:
                runs[-1] = (slot, runs[-1][1], t + 1)
            else:
                runs.append((slot, t, t + 1))
        adapter_runs = [run for run in runs if run[0] != BASE_SLOT]
        long_runs, short = _split_runs(adapter_runs, device) if allow_short else (adapter_runs, None)
        distinct = {slot for slot, _, _ in adapter_runs}
        token_slots = torch.tensor(list(slots), dtype=torch.int64, device=device)
        run_table = torch.tensor(adapter_runs, dtype=torch.int32).reshape(-1, 3)
        if len(adapter_runs) == len(distinct):
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return cls(token_slots, tuple(adapter_runs), False, empty, tuple(long_runs), short, run_table)
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
        return cls(token_slots, tuple(segments), True, order_t, tuple(long_runs), short, run_table)

    @classmethod
    def for_rows(cls, row_slots: Sequence[int], row_lengths: Sequence[int], device: torch.device | str = "cpu"):
        """Mapping for a batch whose row ``i`` has ``row_lengths[i]`` tokens, all using slot ``row_slots[i]``."""
        if len(row_slots) != len(row_lengths):
            raise ValueError("row_slots and row_lengths must have the same length")
        flat = [slot for slot, n in zip(row_slots, row_lengths, strict=True) for _ in range(n)]
        return cls.build(flat, device)


def _split_runs(
    runs: list[tuple[int, int, int]], device: torch.device | str
) -> tuple[list[tuple[int, int, int]], ShortRuns | None]:
    """Long runs for dense matmuls, and the tokens of the short runs when there are enough of them to batch."""
    short = [run for run in runs if run[2] - run[1] <= SHORT_RUN_TOKENS]
    if len(short) < MIN_SHORT_RUNS:
        return runs, None
    by_slot: dict[int, list[int]] = {}
    for slot, start, end in short:
        by_slot.setdefault(slot, []).extend(range(start, end))
    if max(len(tokens) for tokens in by_slot.values()) > SHORT_RUN_TOKENS:
        # A slot whose short runs add up to many tokens would pad every other slot's rows: keep its runs dense.
        crowded = {slot for slot, tokens in by_slot.items() if len(tokens) > SHORT_RUN_TOKENS}
        short = [run for run in short if run[0] not in crowded]
        for slot in crowded:
            del by_slot[slot]
        if len(short) < MIN_SHORT_RUNS:
            return runs, None
    batched = set(short)
    long_runs = [run for run in runs if run not in batched]
    distinct = tuple(sorted(by_slot))
    rows = max(len(tokens) for tokens in by_slot.values())
    tokens: list[int] = []
    cells: list[int] = []
    gather: list[int] = []
    for d, slot in enumerate(distinct):
        mine = by_slot[slot]
        tokens.extend(mine)
        cells.extend(range(d * rows, d * rows + len(mine)))
        gather.extend(mine + [mine[0]] * (rows - len(mine)))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    span = None
    if rows == 1 and tokens == list(range(tokens[0], tokens[0] + len(tokens))):
        span, gather = (tokens[0], tokens[0] + len(tokens)), []
    return long_runs, ShortRuns(
        tensor(list(distinct)), distinct, rows, tensor(gather), tensor(tokens), tensor(cells), span
    )


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
