"""``reference``: gathers every token's weights and multiplies them. Obviously right, slow and memory-hungry
(``T x R x in`` floats); it is the yardstick every fast op is tested against."""

from dataclasses import dataclass

import torch

from server.kernels.mapping import TokenSlotMapping
from server.kernels.protocol import LoraWeights


@dataclass(frozen=True)
class ReferenceMeta:
    token_slots: torch.Tensor  # [T] int64 on the device, the slot of each token


def slot_rows(weights: LoraWeights, device: torch.device) -> torch.Tensor:
    """[S+1, R] int64 on ``device``: pool row j of each slot, ``offsets[s] + j`` for j < ranks[s], else the zero row
    (R = the largest rank of this layer, at least 1)."""
    width = max(1, max(weights.ranks))
    j = torch.arange(width)
    offsets = torch.tensor(weights.offsets).unsqueeze(1)
    ranks = torch.tensor(weights.ranks).unsqueeze(1)
    return torch.where(j < ranks, offsets + j, weights.zero_row).to(device)


def lora_add_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    rows: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """y[t] += scales[s_t] * (x[t] @ a[rows[s_t]].T) @ b[rows[s_t]] for every token t, in place.

    y: [T, out]  x: [T, in]  a: [N+1, in]  b: [N+1, out]  scales: [S+1]  rows: [S+1, R] int64 pool rows of each
    slot padded with the zero row (``slot_rows``)  token_slots: [T] int64.
    """
    token_rows = rows[token_slots]  # [T, R]
    xa = torch.einsum("ti,tri->tr", x, a[token_rows])  # [T, R]
    xa = xa * scales[token_slots].unsqueeze(1)
    y += torch.einsum("tr,tro->to", xa, b[token_rows]).to(y.dtype)


class ReferenceOp:
    """The ``LoraOp`` over ``lora_add_reference``."""

    def prepare(self, mapping: TokenSlotMapping) -> ReferenceMeta:
        return ReferenceMeta(mapping.token_slots())

    def add(self, y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, meta: ReferenceMeta) -> None:
        """y[t] += scales[s_t] * (x[t] @ a[o:o+r].T) @ b[o:o+r] (o, r: offset and rank of s_t).  y: [T, out]
        x: [T, in]  meta.token_slots: [T]."""
        rows = slot_rows(weights, x.device)
        lora_add_reference(y, x, weights.a, weights.b, weights.scales, rows, meta.token_slots)
