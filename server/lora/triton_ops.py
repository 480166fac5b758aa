"""The batched LoRA add as Triton kernels: ``y[t] += scale[s] * (x[t] @ A[s].T) @ B[s]`` with ``s = slot of token t``.

Same semantics, layouts and signature as the ops in ``server.lora.ops`` (it is tested against
``lora_add_reference``), as two launches per layer, a shrink into float32 partials and an expand into ``y``:

- SGMV (segmented, for prefill): tokens come in blocks of one slot, taken from ``mapping.segments``; each block
  multiplies its tokens by its adapter with ``tl.dot`` tiles, so an adapter's weights are read once per block.
- BGMV (gathered, for decode): one program per token reads the token's slot from ``mapping.token_slots``; a GEMV
  per token, no padded rows when every adapter has a single token.

``triton`` picks per step: BGMV when the adapter tokens are at most ``DECODE_TOKENS_PER_SLOT`` per slot present
(decode), SGMV otherwise; ``triton_sgmv`` and ``triton_bgmv`` force one kernel pair (tests, benchmarks).

No host sync: block tables are built from the mapping's host-side ints once per mapping (every layer of the step
reuses them) and copied to the device from pinned memory; each layer's ranks are copied again only when they
change. Triton is imported on first use, so this module imports without it (``TRITON_AVAILABLE``). On CPU tensors
the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` before triton is first imported).
"""

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch

from server.lora.mapping import TokenSlotMapping
from server.lora.slots import BASE_SLOT

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

DECODE_TOKENS_PER_SLOT = 2  # ``triton`` takes the per-token (BGMV) kernels up to this many tokens per slot on average
TILE_ELEMENTS = 8192  # BGMV tiles are [BLOCK_R, BLOCK_K or BLOCK_N]; this bounds their size (registers)
PROGRAMS_PER_SM = 4  # the reduction is split until the shrink launches about this many programs per SM


@cache
def kernels() -> ModuleType:
    """The compiled-on-demand kernel module (imports triton); raises ImportError without triton."""
    from server.lora import triton_kernels

    return triton_kernels


@cache
def triton_usable() -> bool:
    """Whether triton imports here; checked once, by ``select_op`` on CUDA."""
    try:
        kernels()
    except Exception:  # a broken install counts as no triton: fall back to the torch op
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class _Plan:
    """What the kernels need from one step's mapping, built once and shared by every layer of the step.

    slots:      adapter slots present (host ints), for the largest rank of a layer in this step
    decode:     True: BGMV over ``token_slots``; False: SGMV over ``blocks``
    blocks:     [num_blocks * 3] int32 on the device, (slot, start, end) positions of each block of <= block_m
                tokens of one slot; positions index ``x`` directly, or ``x[order]`` when ``gathered``
    order:      [N] int64 adapter tokens sorted by slot when ``gathered``, else any int64 tensor (never read)
    """

    slots: tuple[int, ...]
    decode: bool
    blocks: torch.Tensor
    num_blocks: int
    block_m: int
    gathered: bool
    order: torch.Tensor


class TritonLoraAdd:
    """A ``LoraAddOp`` backed by the Triton kernels; ``mode`` is ``auto``, ``sgmv`` or ``bgmv``."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "sgmv", "bgmv"):
            raise ValueError(f"unknown Triton LoRA mode {mode!r}")
        self.mode = mode
        self._plan_mapping: TokenSlotMapping | None = None  # one-entry cache: every layer of a step asks alike
        self._plan: _Plan | None = None
        self._ranks: dict[tuple[int, torch.device], tuple[tuple[int, ...], torch.Tensor]] = {}

    def __call__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scales: torch.Tensor,
        ranks: Sequence[int],
        mapping: TokenSlotMapping,
    ) -> None:
        """y[t] += scales[s_t] * (x[t] @ a[s_t, :r].T) @ b[s_t, :r] for every token t not on BASE_SLOT, in place.

        y: [T, out] float16/bfloat16/float32    x: [T, in] same dtype    a: [S+1, R, in]    b: [S+1, R, out]
        scales: [S+1]    ranks: host list, r = ranks[s] <= R (rows past it are never read)
        mapping.token_slots: [T] int64; segments as documented in ``TokenSlotMapping``.
        """
        if not mapping.segments:
            return
        plan = self._plan_of(mapping)
        rank_max = max(map(ranks.__getitem__, plan.slots))
        if rank_max == 0:  # no adapter in this step touches this layer
            return
        if x.device.type != "cuda" and not interpreting():
            raise RuntimeError("the Triton LoRA kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        k = kernels()
        rank_t = self._rank_tensor(ranks, a.device)
        tokens, d_in = x.shape
        d_out = y.shape[1]
        block_r = max(16, _pow2(rank_max))
        upcast = interpreting()
        if plan.decode:
            block_k = max(16, min(_pow2(d_in), TILE_ELEMENTS // block_r))
            block_n = max(16, min(_pow2(d_out), TILE_ELEMENTS // block_r))
            split_k = _split_k(tokens, d_in, block_k, x.device)
            part = torch.empty((split_k, tokens, block_r), dtype=torch.float32, device=x.device)
            k.bgmv_shrink_kernel[(tokens, split_k)](
                x, a, part, mapping.token_slots, rank_t, d_in, split_k,
                x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), part.stride(0), part.stride(1),
                BLOCK_R=block_r, BLOCK_K=block_k, BASE=BASE_SLOT,
            )  # fmt: skip
            k.bgmv_expand_kernel[(tokens, _cdiv(d_out, block_n))](
                part, b, scales, y, mapping.token_slots, rank_t, d_out, split_k,
                part.stride(0), part.stride(1), b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
                BLOCK_R=block_r, BLOCK_N=block_n, BASE=BASE_SLOT,
            )  # fmt: skip
            return
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only applies to float32 operands
        block_k = max(16, min(_pow2(d_in), 64))
        block_n = max(16, min(_pow2(d_out), 128))
        split_k = _split_k(plan.num_blocks, d_in, block_k, x.device)
        part = torch.empty((split_k, tokens, block_r), dtype=torch.float32, device=x.device)
        k.sgmv_shrink_kernel[(plan.num_blocks, split_k)](
            x, a, part, plan.blocks, plan.order, rank_t, d_in, split_k,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), part.stride(0), part.stride(1),
            BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_K=block_k, GATHERED=plan.gathered,
            PRECISION=precision, UPCAST_DOT=upcast,
        )  # fmt: skip
        k.sgmv_expand_kernel[(plan.num_blocks, _cdiv(d_out, block_n))](
            part, b, scales, y, plan.blocks, plan.order, rank_t, d_out, split_k,
            part.stride(0), part.stride(1), b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
            BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_N=block_n, GATHERED=plan.gathered,
            PRECISION=precision, UPCAST_DOT=upcast,
        )  # fmt: skip

    def _plan_of(self, mapping: TokenSlotMapping) -> _Plan:
        if self._plan_mapping is not mapping or self._plan is None:
            self._plan = self._build_plan(mapping)
            self._plan_mapping = mapping
        return self._plan

    def _build_plan(self, mapping: TokenSlotMapping) -> _Plan:
        segments = mapping.segments
        slots = tuple(slot for slot, _, _ in segments)
        lengths = [end - start for _, start, end in segments]
        device = mapping.token_slots.device
        decode = self.mode == "bgmv" or (self.mode == "auto" and sum(lengths) <= DECODE_TOKENS_PER_SLOT * len(segments))
        if decode:
            empty = torch.empty(0, dtype=torch.int32, device=device)
            return _Plan(slots, True, empty, 0, 0, False, mapping.token_slots)
        longest = max(lengths)
        block_m = 16 if longest <= 16 else 32 if longest <= 32 else 64
        blocks: list[int] = []
        for slot, start, end in segments:
            for lo in range(start, end, block_m):
                blocks += (slot, lo, min(lo + block_m, end))
        order = mapping.order if mapping.gathered else mapping.token_slots
        return _Plan(slots, False, _upload(blocks, device), len(blocks) // 3, block_m, mapping.gathered, order)

    def _rank_tensor(self, ranks: Sequence[int], device: torch.device) -> torch.Tensor:
        """ranks as [S+1] int32 on ``device``; copied again only when a slot of this layer changed."""
        key = (id(ranks), device)
        snapshot = tuple(ranks)
        cached = self._ranks.get(key)
        if cached is not None and cached[0] == snapshot:
            return cached[1]
        if len(self._ranks) > 4096:  # layers come and go in tests; ids may be reused, the snapshot check covers it
            self._ranks.clear()
        tensor = _upload(list(snapshot), device)
        self._ranks[key] = (snapshot, tensor)
        return tensor


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
    return 8  # the interpreter: enough programs that tests split the reduction


def _split_k(rows: int, d_in: int, block_k: int, device: torch.device) -> int:
    """Ways to split the reduction so ``rows * split`` programs fill the device; a power of two, at most the chunks."""
    want = _cdiv(PROGRAMS_PER_SM * _sm_count(device), rows)
    chunks = _cdiv(d_in, block_k)
    split = 1
    while split < want and split * 2 <= chunks:
        split *= 2
    return split


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


OPS: dict[str, TritonLoraAdd] = {
    "triton": TritonLoraAdd("auto"),
    "triton_sgmv": TritonLoraAdd("sgmv"),
    "triton_bgmv": TritonLoraAdd("bgmv"),
}
