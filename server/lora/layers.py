"""``BatchedLoraLinear``: a frozen ``nn.Linear`` plus a pool of LoRA rank rows for all slots, applied unmerged per
token."""

from typing import Any

import torch
from torch import nn

from server.kernels.protocol import LoraOp, LoraWeights
from server.kernels.slots import BASE_SLOT
from server.lora.context import LoraContext
from server.lora.dora import apply_dora, dora_factor


class BatchedLoraLinear(nn.Module):
    """``y = base(x) + scale[s] * (x @ A[o:o+r].T) @ B[o:o+r]`` where ``s`` is each token's slot from the shared
    context and ``(o, r)`` the slot's rows in the pool.

    The pool is preallocated at startup so loading an adapter is a copy into rows, never an allocation:
        lora_a: [N+1, in]    lora_b: [N+1, out]    scales: [S+1]
    ``N`` rank rows are shared by all ``S`` slots, each adapter at its own rank (the slot cache places it at the
    same offset in every layer); row ``N`` stays zero (``LoraWeights.zero_row``). ``weights`` hands the pool to the
    op as one object, with each slot's offset and true rank for this layer (host ints) and per-slot views.

    A DoRA adapter takes one row more, past its largest rank, whose B row holds ``g - 1`` (``server.lora.dora``):
    zero in layers it does not adapt, and its A row zero; no op reads it (the op's ranks stop before it). After the
    LoRA add, the step's DoRA tokens are rescaled with it. ``weight_norms_sq`` ([out] float64, ``||W_i||^2``, taken
    by the model from the dense base weight before packing) is what the DoRA norms need from the base.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        num_slots: int,
        pool_rows: int,
        context: LoraContext,
        op: LoraOp[Any],
        weight_norms_sq: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.op = op
        # dtype: the pool's (the model's compute dtype; a quantized base's weight has another)
        dtype, device = dtype or base.weight.dtype, base.weight.device
        rows = pool_rows + 1  # + the zero row
        # On the CPU the pool is left unwritten (torch.empty): zeros would make every page resident at startup, while
        # untouched pages cost no memory until an adapter is written there. No op reads a row outside a resident
        # slot's range except the zero row (the tests fill free rows with NaN to pin that).
        alloc = torch.empty if device.type == "cpu" else torch.zeros
        self.register_buffer("lora_a", alloc(rows, base.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", alloc(rows, base.out_features, dtype=dtype, device=device))
        self.lora_a[pool_rows].zero_()
        self.lora_b[pool_rows].zero_()
        self.register_buffer("scales", torch.zeros(num_slots + 1, dtype=dtype, device=device))
        self.weights = LoraWeights(self.lora_a, self.lora_b, self.scales)
        self.num_slots = num_slots
        self.weight_norms_sq = weight_norms_sq
        self.dora_rows: dict[int, int] = {}  # DoRA slot -> its pool row of g - 1 (every DoRA slot, adapted here or not)
        self.dora_slots: set[int] = set()  # the DoRA slots this layer adapts (g - 1 not all zero)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def pool_rows(self) -> int:
        return self.weights.pool_rows

    def home_offset(self, slot: int) -> int:
        """A fixed offset for ``slot`` when adapters are placed by hand (no slot cache): the pool split evenly among
        the slots, which with the default pool (``num_slots * max_rank`` rows) is one max-rank range per slot."""
        return (slot - 1) * (self.pool_rows // self.num_slots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]; the mapping covers the flattened leading dimensions.
        y = self.base(x)
        step = self.context.step
        if step is None:
            return y
        x2 = x.reshape(-1, self.base.in_features)
        y2 = y.view(-1, self.base.out_features)
        if x2.shape[0] != step.num_tokens:
            raise RuntimeError(f"LoRA mapping covers {step.num_tokens} tokens but the layer got {x2.shape[0]}")
        self.op.add(y2, x2, self.weights, step.meta)
        if step.dora is not None and not self.dora_slots.isdisjoint(step.dora.slots):
            apply_dora(y2, self.base.bias, self.lora_b, step.dora)
        return y

    @torch.no_grad()
    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float, offset: int | None = None) -> None:
        """Load one adapter's weights for this layer into ``slot``, at pool rows ``offset .. offset + r - 1``.

        a: [r, in] (PEFT lora_A.weight)    b: [out, r] (PEFT lora_B.weight)    offset: None = ``home_offset(slot)``
        Rows outside a slot's range are never read by the ops, so nothing else is zeroed.
        """
        self._check_slot(slot)
        r = a.shape[0]
        offset = self.home_offset(slot) if offset is None else offset
        if not 0 <= offset <= offset + r <= self.pool_rows:
            raise ValueError(f"rows {offset}..{offset + r - 1} of slot {slot} are outside the pool of {self.pool_rows}")
        self.lora_a[offset : offset + r].copy_(a, non_blocking=True)
        self.lora_b[offset : offset + r].copy_(b.T, non_blocking=True)
        self.scales[slot] = scale
        self.weights.set(slot, offset, r, scale)
        self._forget_dora(slot)

    @torch.no_grad()
    def write_dora(self, slot: int, row: int, magnitude: torch.Tensor | None) -> None:
        """Make ``slot`` a DoRA slot in this layer, its ``g - 1`` in pool row ``row`` (past its LoRA rows).

        magnitude: [out] (PEFT lora_magnitude_vector) for the adapter's weights written in this layer by
        ``write_slot`` just before; None when the adapter does not adapt this layer (g - 1 = 0 here).
        """
        self._check_slot(slot)
        if not 0 <= row < self.pool_rows:
            raise ValueError(f"DoRA row {row} of slot {slot} is outside the pool of {self.pool_rows}")
        view = self.weights.of[slot]
        if magnitude is not None and view is None:
            raise ValueError(f"slot {slot} has no LoRA weights in this layer to take a DoRA magnitude")
        self.lora_a[row].zero_()
        if magnitude is None or view is None:
            self.lora_b[row].zero_()
            self.dora_slots.discard(slot)
        else:
            if self.weight_norms_sq is None:
                raise ValueError("this layer was built without the base weight's row norms that DoRA needs")
            a_t, b_rows, scale = view  # a_t [in, r], b_rows [r, out]: the rows just written
            factor = dora_factor(self.base, self.weight_norms_sq, a_t.T, b_rows.T, scale, magnitude)
            self.lora_b[row].copy_(factor)
            self.dora_slots.add(slot)
        self.dora_rows[slot] = row

    @torch.no_grad()
    def move_dora(self, slot: int, row: int) -> None:
        """Move ``slot``'s DoRA row to ``row`` (compaction; after ``move_slot`` moved its LoRA rows)."""
        old = self.dora_rows.get(slot)
        if old is None or old == row:
            return
        self.lora_a[row].zero_()
        self.lora_b[row].copy_(self.lora_b[old])
        self.dora_rows[slot] = row

    def _forget_dora(self, slot: int) -> None:
        self.dora_rows.pop(slot, None)
        self.dora_slots.discard(slot)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Empty ``slot`` in this layer: rank 0 and scale 0, so no op reads its rows (they are left as they are)."""
        self._check_slot(slot)
        self._forget_dora(slot)
        if self.weights.ranks[slot] == 0:
            return  # already empty
        self.scales[slot] = 0.0
        self.weights.set(slot, 0, 0, 0.0)

    @torch.no_grad()
    def move_slot(self, slot: int, offset: int) -> None:
        """Move ``slot``'s rows down to start at ``offset`` (compaction). Overlapping ranges are copied in chunks
        no longer than the shift, first rows first, so each chunk lands on rows already copied (no temporary)."""
        self._check_slot(slot)
        old, r, view = self.weights.offsets[slot], self.weights.ranks[slot], self.weights.of[slot]
        if view is None or old == offset:
            return
        if not 0 <= offset < old:
            raise ValueError(f"slot {slot} moves down only (rows {old} -> {offset})")
        shift = old - offset
        for start in range(0, r, shift):
            n = min(shift, r - start)
            self.lora_a[offset + start : offset + start + n].copy_(self.lora_a[old + start : old + start + n])
            self.lora_b[offset + start : offset + start + n].copy_(self.lora_b[old + start : old + start + n])
        self.weights.set(slot, offset, r, view[2])

    def _check_slot(self, slot: int) -> None:
        if not BASE_SLOT < slot < self.scales.shape[0]:
            raise ValueError(f"slot {slot} is not an adapter slot (1..{self.scales.shape[0] - 1})")

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, pool_rows={self.pool_rows}"
