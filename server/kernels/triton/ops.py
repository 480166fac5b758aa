"""The batched LoRA add as Triton kernels: ``y[t] += scale[s] * (x[t] @ A[s].T) @ B[s]`` with ``s = slot of token t``.

Same semantics, layouts and protocol as the other ops (``server.kernels.protocol``), tested against the reference:

- SGMV (segmented, for prefill), two launches per layer: a shrink of blocks of one slot's tokens (each slot's
  tokens as one segment, gathered through ``order`` when they are not consecutive) into float32 partials, then
  an expand into ``y``; both ``tl.dot`` tiles, so an adapter's weights are read once per block of tokens.
- BGMV (gathered, for decode), one launch per layer: one program per (token, column slice) reads the token's slot
  from ``token_slots`` and does the token's two small GEMVs; no padded rows, no partials in memory.

``triton`` picks per step: BGMV while no slot has more than ``BGMV_MAX_TOKENS_PER_SLOT`` tokens (decode steps),
SGMV otherwise (prefill, steps with a prompt chunk, many rows on one adapter); ``triton_sgmv`` and ``triton_bgmv``
force one (tests, benchmarks). The kernels are in ``server.kernels.triton.kernels``.

No host sync and little host work, since a decode step makes one call per wrapped layer: the plan (block table,
grids) is this op's per-step metadata, built by ``prepare`` from the mapping's host-side ints and shared by every
layer of the step, block
tables and slot tables reach the device from pinned memory, a layer's slot table (each slot's pool offset and rank)
is copied again only when it changes (``LoraWeights.version``),
and SGMV's partials live in one reused workspace. Triton is imported on first use, so this module imports without
it (``TRITON_AVAILABLE``). CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported; the tests do that in a subprocess).
"""

import importlib.util
import os
import weakref
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType

import torch

from server.kernels.mapping import Run, TokenSlotMapping
from server.kernels.protocol import LoraWeights
from server.kernels.slots import BASE_SLOT

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

# ``triton`` takes the per-token (BGMV) kernel while no slot has more tokens than this: a decode step, however many
# adapters. Past it, re-reading an adapter's weights for every token (from L2) costs more than SGMV's second launch.
BGMV_MAX_TOKENS_PER_SLOT = 32
TILE_ELEMENTS = 8192  # BGMV tiles are [BLOCK_R, BLOCK_K or BLOCK_N]; this bounds their size (registers)
PROGRAMS_PER_SM = 4  # SGMV splits reductions, narrows output tiles, until a launch has about this many programs per SM
MAX_SPLIT_K = 16  # SGMV: more splits make the expand sum more partials than the split saves
MAX_COLUMN_SLICES = 8  # BGMV: every column slice of a token recomputes its x @ A.T row (from L2)


@cache
def kernels() -> ModuleType:
    """The compiled-on-demand kernel module (imports triton); raises ImportError without triton."""
    from server.kernels.triton import kernels as triton_kernels

    return triton_kernels


@cache
def triton_usable() -> bool:
    """Whether triton imports here; checked once, by ``select_op`` on CUDA."""
    try:
        kernels()
    except Exception:  # a broken install counts as no triton: fall back to the torch op
        return False
    return True


@cache
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter; read once, as triton itself does when first imported."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class _Launch:
    """Grids and tiles for one layer shape under one plan; partials are [split_k, T, block_r] in the workspace."""

    shrink_grid: tuple[int, int]  # SGMV only
    expand_grid: tuple[int, int]  # the expand, or the one BGMV launch
    block_r: int
    block_k: int
    block_n: int
    split_k: int  # SGMV: ways the shrink's reduction is split
    n_per_program: int  # BGMV: output columns per program
    precision: str


@dataclass(frozen=True, eq=False)
class TritonMeta:
    """What the kernels need from one step's mapping (the plan), built once and shared by every layer of the step.

    slots:       adapter slots present (host ints), for the largest rank of a layer in this step
    decode:      True: BGMV over ``token_slots``; False: SGMV over ``blocks``
    token_slots: [T] int64 on the device, the slot of each token
    blocks:      [num_blocks * 3] int32 on the device, (slot, start, end) positions of each block of <= block_m
                 tokens of one slot; positions index ``x`` directly, or ``x[order]`` when ``gathered``
    order:       [N] int64 adapter tokens sorted by slot when ``gathered``, else any int64 tensor (never read)
    launches:    (in, out, rank, dtype) -> _Launch, filled by the first layer of each shape
    """

    slots: tuple[int, ...]
    decode: bool
    token_slots: torch.Tensor
    blocks: torch.Tensor
    num_blocks: int
    block_m: int
    gathered: bool
    order: torch.Tensor
    launches: dict[tuple[int, int, int, torch.dtype], _Launch] = field(default_factory=dict)


class TritonOp:
    """The ``LoraOp`` of the Triton kernels; ``mode`` is ``auto``, ``sgmv`` or ``bgmv``.

    A call costs one (decode) or two (SGMV) launches and a few look-ups. SGMV's float32 partials live in one
    workspace reused by every layer: launches on one stream run in order, so a layer never overwrites partials
    that the previous layer still reads (do not share an instance between streams).
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "sgmv", "bgmv"):
            raise ValueError(f"unknown Triton LoRA mode {mode!r}")
        self.mode = mode
        # id(weights) -> (the weights, their version, their slot table on the device)
        self._tables: dict[int, tuple[weakref.ref[LoraWeights], int, torch.Tensor]] = {}
        self._workspace = torch.empty(0)

    def add(self, y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, meta: TritonMeta) -> None:
        """y[t] += scales[s_t] * (x[t] @ a[o:o+r].T) @ b[o:o+r] for every token t not on BASE_SLOT, in place.

        y: [T, out] float16/bfloat16/float32    x: [T, in] same dtype    a: [N+1, in]    b: [N+1, out] (pools)
        scales: [S+1]    (o, r) = weights' slot table row of s_t (pool rows outside it are never read)
        meta: from ``prepare``
        """
        plan = meta
        if not plan.slots:
            return
        a, b, scales = weights.a, weights.b, weights.scales
        ranks = weights.ranks
        rank_max = max(map(ranks.__getitem__, plan.slots))
        if rank_max == 0:  # no adapter in this step touches this layer
            return
        table = self._table_of(weights)
        tokens, d_in = x.shape
        d_out = y.shape[1]
        key = (d_in, d_out, rank_max, x.dtype)
        go = plan.launches.get(key) or self._new_launch(plan, key, tokens)
        k = kernels()
        ws, (sxt, sxk), (sar, sak), (sbr, sbn), (syt, syn) = (
            self._workspace, x.stride(), a.stride(), b.stride(), y.stride()
        )  # fmt: skip
        if plan.decode:
            k.bgmv_kernel[go.expand_grid](
                x, a, b, scales, y, plan.token_slots, table, d_in, d_out, go.n_per_program,
                sxt, sxk, sar, sak, sbr, sbn, syt, syn,
                BLOCK_R=go.block_r, BLOCK_K=go.block_k, BLOCK_N=go.block_n, BASE=BASE_SLOT,
            )  # fmt: skip
            return
        sps = tokens * go.block_r
        upcast = interpreting()
        k.sgmv_shrink_kernel[go.shrink_grid](
            x, a, ws, plan.blocks, plan.order, table, d_in, go.split_k,
            sxt, sxk, sar, sak, sps, go.block_r,
            BLOCK_M=plan.block_m, BLOCK_R=go.block_r, BLOCK_K=go.block_k, GATHERED=plan.gathered,
            PRECISION=go.precision, UPCAST_DOT=upcast,
        )  # fmt: skip
        k.sgmv_expand_kernel[go.expand_grid](
            ws, b, scales, y, plan.blocks, plan.order, table, d_out, go.split_k,
            sps, go.block_r, sbr, sbn, syt, syn,
            BLOCK_M=plan.block_m, BLOCK_R=go.block_r, BLOCK_N=go.block_n, GATHERED=plan.gathered,
            PRECISION=go.precision, UPCAST_DOT=upcast,
        )  # fmt: skip

    def prepare(self, mapping: TokenSlotMapping) -> TritonMeta:
        """The step's plan: BGMV or SGMV, and SGMV's block table (one upload per step, shared by every layer)."""
        device = mapping.device
        if device.type != "cuda" and not interpreting():
            raise RuntimeError("the Triton LoRA kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        if self._workspace.device != device:
            self._workspace = torch.empty(0, dtype=torch.float32, device=device)
        return self.plan(mapping)

    def plan(self, mapping: TokenSlotMapping) -> TritonMeta:
        """``prepare`` without the device check (plan tests run without a GPU)."""
        device = mapping.device
        token_slots = mapping.token_slots()
        segments, gathered, order = _segments(mapping)
        slots = tuple(slot for slot, _, _ in segments)
        lengths = [end - start for _, start, end in segments]
        empty = torch.empty(0, dtype=torch.int32, device=device)
        if not segments:
            return TritonMeta((), True, token_slots, empty, 0, 0, False, token_slots)
        decode = self.mode == "bgmv" or (self.mode == "auto" and max(lengths) <= BGMV_MAX_TOKENS_PER_SLOT)
        if decode:
            return TritonMeta(slots, True, token_slots, empty, 0, 0, False, token_slots)
        longest = max(lengths)
        block_m = 16 if longest <= 16 else 32 if longest <= 32 else 64
        blocks: list[int] = []
        for slot, start, end in segments:
            for lo in range(start, end, block_m):
                blocks += (slot, lo, min(lo + block_m, end))
        order = order if gathered else token_slots
        blocks_t = _upload(blocks, device)
        return TritonMeta(slots, False, token_slots, blocks_t, len(blocks) // 3, block_m, gathered, order)

    def _new_launch(self, plan: TritonMeta, key: tuple[int, int, int, torch.dtype], tokens: int) -> _Launch:
        d_in, d_out, rank_max, dtype = key
        device = self._workspace.device
        block_r = max(16, _pow2(rank_max))
        precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 applies to float32 operands only
        if plan.decode:  # one launch: (token, column slice) programs, about one wave of them
            block_k = max(16, min(_pow2(d_in), TILE_ELEMENTS // block_r))
            block_n = max(16, min(_pow2(d_out), TILE_ELEMENTS // block_r))
            col_blocks = _cdiv(d_out, block_n)
            split_n = max(1, min(col_blocks, MAX_COLUMN_SLICES, _cdiv(_sm_count(device), tokens)))
            per_program = _cdiv(col_blocks, split_n) * block_n
            grid = (tokens, _cdiv(d_out, per_program))
            launch = _Launch(grid, grid, block_r, block_k, block_n, 1, per_program, precision)
        else:
            rows = plan.num_blocks
            block_k = max(16, min(_pow2(d_in), 64))
            block_n = _block_n(rows, d_out, 128, device)
            split_k = _split_k(rows, d_in, block_k, device)
            if self._workspace.numel() < split_k * tokens * block_r:
                self._workspace = torch.empty(2 * split_k * tokens * block_r, dtype=torch.float32, device=device)
            shrink, expand = (rows, split_k), (rows, _cdiv(d_out, block_n))
            launch = _Launch(shrink, expand, block_r, block_k, block_n, split_k, 0, precision)
        plan.launches[key] = launch
        return launch

    def _table_of(self, weights: LoraWeights) -> torch.Tensor:
        """The layer's slot table ([S+1, 2] int32 (offset, rank)) on the device, copied again only when a slot of
        the layer was written, moved or cleared since (``weights.version``)."""
        cached = self._tables.get(id(weights))
        if cached is None or cached[0]() is not weights or cached[1] != weights.version:
            if len(self._tables) > 4096:  # layers come and go in tests
                self._tables.clear()
            table = _upload(weights.slot_table.flatten().tolist(), weights.a.device)
            cached = self._tables[id(weights)] = (weakref.ref(weights), weights.version, table)
        return cached[2]


def _segments(mapping: TokenSlotMapping) -> tuple[list[Run], bool, torch.Tensor]:
    """Each adapter slot's tokens as one segment (slot, start, end), whether they had to be gathered, and how.

    Not gathered (every slot's tokens already one run): segments index the tokens directly, ``order`` is empty.
    Gathered: segments index ``x[order]``, ``order`` ([N] int64 on the device) the adapter tokens sorted by slot.
    """
    if not mapping.gathered:
        return list(mapping.runs), False, torch.empty(0, dtype=torch.int64, device=mapping.device)
    by_slot: dict[int, list[int]] = {}
    for slot, start, end in mapping.runs:
        by_slot.setdefault(slot, []).extend(range(start, end))
    order: list[int] = []
    segments: list[Run] = []
    for slot in sorted(by_slot):
        positions = by_slot[slot]
        segments.append((slot, len(order), len(order) + len(positions)))
        order.extend(positions)
    return segments, True, torch.tensor(order, dtype=torch.int64, device=mapping.device)


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """values as int32 on ``device``; through pinned memory on CUDA so the copy does not wait for the stream."""
    host = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 16  # the interpreter: enough programs that tests split reductions and columns


def _split_k(rows: int, d_in: int, block_k: int, device: torch.device) -> int:
    """Ways to split the reduction so ``rows * split`` programs fill the device; a power of two, at most the chunks."""
    want = _cdiv(PROGRAMS_PER_SM * _sm_count(device), rows)
    chunks = _cdiv(d_in, block_k)
    split = 1
    while split < want and split * 2 <= min(chunks, MAX_SPLIT_K):
        split *= 2
    return split


def _block_n(rows: int, d_out: int, largest: int, device: torch.device) -> int:
    """Output columns per expand program: ``largest`` unless fewer columns are needed to fill the device."""
    block_n = max(16, min(_pow2(d_out), largest))
    while block_n > 64 and rows * _cdiv(d_out, block_n) < PROGRAMS_PER_SM * _sm_count(device):
        block_n //= 2
    return block_n


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


OPS: dict[str, TritonOp] = {
    "triton": TritonOp("auto"),
    "triton_sgmv": TritonOp("sgmv"),
    "triton_bgmv": TritonOp("bgmv"),
}
