"""``grouped``: the batched LoRA add by torch matmuls, one dense pair per run of an adapter's tokens.

The tokens of one adapter that sit next to each other (a prompt chunk, or one adapter's decode tokens; the runner
sorts tokens by slot) form a run, and each run gets two small dense matmuls at its slot's true rank through the
layer's per-slot views: the SGMV layout of Punica/LoRAX written with torch matmuls. Short runs cost one dispatch
pair per adapter that way, so when a step has many of them (``MIN_SHORT_RUNS``) they go on a [slots, rows] grid,
the used slots' pool rows are gathered once (each padded to the largest rank among them with the pool's zero row)
and two ``bmm`` calls do the add: a fixed number of calls however many adapters the step mixes.
"""

from dataclasses import dataclass, field

import torch

from server.kernels.mapping import Run, TokenSlotMapping
from server.kernels.protocol import LoraWeights

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
    pool_rows: per layout of the slots' (offset, rank) in a layer: the [D*r] int64 pool rows to gather and r (the
            largest of those ranks); filled by the first layer of each layout (layers of one shape share one)
    """

    slots: torch.Tensor
    distinct: tuple[int, ...]
    rows: int
    gather: torch.Tensor
    tokens: torch.Tensor
    cells: torch.Tensor
    span: tuple[int, int] | None
    pool_rows: dict[tuple[int, ...], tuple[torch.Tensor, int]] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class GroupedMeta:
    """runs:  host (slot, start, end) runs added by two dense matmuls each (every run when ``short`` is None, else
              the long ones)
    short: the tokens of the short runs, on a slot grid; None when there are too few short runs to pay
    """

    runs: tuple[Run, ...]
    short: ShortRuns | None


class GroupedOp:
    """The ``LoraOp`` of torch matmuls; ``short_grid=False`` keeps every run dense (benchmarks, tests)."""

    def __init__(self, short_grid: bool = True) -> None:
        self.short_grid = short_grid

    def prepare(self, mapping: TokenSlotMapping) -> GroupedMeta:
        if not self.short_grid:
            return GroupedMeta(mapping.runs, None)
        long_runs, short = _split_runs(list(mapping.runs), mapping.device)
        return GroupedMeta(tuple(long_runs), short)

    def add(self, y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, meta: GroupedMeta) -> None:
        """y[t] += scales[s] * (x[t] @ a[o:o+r].T) @ b[o:o+r]: each long run by two dense matmuls, short runs on a grid.

        y: [T, out]  x: [T, in]. Tokens of BASE_SLOT are skipped. ``meta.runs`` are host-side ints, so no device
        sync happens here; each run is computed at its slot's true rank, in place on slices of ``x`` and ``y``,
        through the layer's per-slot views (``weights.of``).
        """
        if meta.runs:
            of = weights.of
            for slot, start, end in meta.runs:
                if (view := of[slot]) is not None:
                    a_t, b_r, scale = view  # [in, r], [r, out]
                    y[start:end].addmm_(x[start:end] @ a_t, b_r, alpha=scale)  # [n, out]
        if meta.short is not None:
            _lora_add_short(y, x, weights, meta.short)


def _split_runs(runs: list[Run], device: torch.device) -> tuple[list[Run], ShortRuns | None]:
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


def _lora_add_short(y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, short: ShortRuns) -> None:
    """The same add for the short-run tokens, over a [D slots, M rows] grid with two ``bmm`` calls.

    Gathers the D slots' A and B rows (``[D, r, in]``, ``[D, r, out]``, r = the largest rank present, a smaller
    rank padded with the zero row: the bytes the per-slot matmuls would read anyway) so the call count does not grow
    with the number of adapters.
    """
    rows, r = _short_pool_rows(weights, short)
    if r == 0:
        return
    d, m = len(short.distinct), short.rows
    if short.span is not None:
        start, end = short.span
        grid = x[start:end].view(d, 1, -1)  # [D, 1, in]
    else:
        grid = x.index_select(0, short.gather).view(d, m, -1)  # [D, M, in]
    a_used = weights.a.index_select(0, rows).view(d, r, -1)  # [D, r, in]
    b_used = weights.b.index_select(0, rows).view(d, r, -1)  # [D, r, out]
    xa = torch.bmm(grid, a_used.transpose(1, 2))  # [D, M, r]
    xa.mul_(weights.scales.index_select(0, short.slots).view(d, 1, 1))
    out = torch.bmm(xa, b_used).view(d * m, -1)  # [D*M, out]
    if short.span is not None:
        y[start:end] += out.to(y.dtype)
    else:
        y.index_add_(0, short.tokens, out.index_select(0, short.cells).to(y.dtype))


def _short_pool_rows(weights: LoraWeights, short: ShortRuns) -> tuple[torch.Tensor, int]:
    """[D*r] int64 pool rows of the grid's slots in this layer, each slot's padded to r with the zero row, and r."""
    offsets, ranks = weights.offsets, weights.ranks
    key = (weights.zero_row, *(v for s in short.distinct for v in (offsets[s], ranks[s])))
    cached = short.pool_rows.get(key)
    if cached is None:
        r = max(ranks[s] for s in short.distinct)
        zero = weights.zero_row
        rows = [offsets[s] + j if j < ranks[s] else zero for s in short.distinct for j in range(r)]
        cached = short.pool_rows[key] = (torch.tensor(rows, dtype=torch.int64, device=short.slots.device), r)
    return cached
