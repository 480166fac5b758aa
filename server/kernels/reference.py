"""``reference``: gathers every token's weights and multiplies them. Obviously right, slow and memory-hungry
(``T x R x in`` floats); it is the yardstick every fast op is tested against."""

from dataclasses import dataclass

import torch

from server.kernels.mapping import TokenSlotMapping
from server.kernels.protocol import LoraWeights


@dataclass(frozen=True)
class ReferenceMeta:
    token_slots: torch.Tensor  # [T] int64 on the device, the slot of each token


def lora_add_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """y[t] += scales[s_t] * (x[t] @ a[s_t].T) @ b[s_t] for every token t, in place.

    y: [T, out]  x: [T, in]  a: [S+1, R, in]  b: [S+1, R, out]  scales: [S+1]  token_slots: [T] int64.
    Uses the full padded rank R (zero rows contribute nothing), so stale data past a rank would show up here.
    """
    xa = torch.einsum("ti,tri->tr", x, a[token_slots])  # [T, R]
    xa = xa * scales[token_slots].unsqueeze(1)
    y += torch.einsum("tr,tro->to", xa, b[token_slots]).to(y.dtype)


class ReferenceOp:
    """The ``LoraOp`` over ``lora_add_reference``."""

    def prepare(self, mapping: TokenSlotMapping) -> ReferenceMeta:
        return ReferenceMeta(mapping.token_slots())

    def add(self, y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, meta: ReferenceMeta) -> None:
        """y[t] += scales[s_t] * (x[t] @ a[s_t].T) @ b[s_t].  y: [T, out]  x: [T, in]  meta.token_slots: [T]."""
        lora_add_reference(y, x, weights.a, weights.b, weights.scales, meta.token_slots)
