"""DoRA (weight-decomposed LoRA) on top of the batched LoRA add, as PEFT's ``DoraLinearLayer`` computes it.

PEFT's DoRA output for a token on an adapter with magnitude ``m`` [out]:
    y = bias + g * (x @ W.T + scale * (x @ A.T) @ B.T)    g = m / ||W + scale * B @ A||_row    [out]
(the norm per output feature, over the input dimension; ``W`` the base weight as it computes, dequantized when
stored quantized). ``g`` is fixed once the adapter is loaded, so it is computed when a slot is written and kept in
the pool as ``g - 1``; per step, after the LoRA add has made ``y = base(x) + scale * (x @ A.T) @ B.T``,
    y += (g - 1) * (y - bias)
gives the formula above on the DoRA tokens only (PEFT adds ``(g - 1) * (base - bias) + g * lora`` to ``base``: the
same terms). A layer a DoRA adapter does not adapt keeps ``g - 1 = 0`` there, which leaves ``y`` exactly as it is.

The norms need the dense weight, which the packed or quantized base no longer holds, so they are expanded:
    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s sum_k B_ik (A W^T)_ki + s^2 ||B_i A||^2
with ``||W_i||^2`` taken once per layer at startup and ``A W^T = base(A) - bias``: the base module run on A's ``r``
rows. Writing a slot costs one base product over ``r`` rows plus ``O(r^2 (in + out))`` per layer, in float64.
"""

import torch
from torch import nn

from server.lora.context import DoraTokens


@torch.no_grad()
def weight_row_norms_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 of every output row: weight [out, in] (float32) -> [out] float64 (accumulated in float64)."""
    return (weight * weight).sum(dim=1, dtype=torch.float64)


@torch.no_grad()
def dora_factor(
    base: nn.Module,
    weight_norms_sq: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """g - 1 with g = magnitude / ||W + scale * B @ A||_row, W being the weight ``base`` computes with.

    base: the frozen linear (``y = x @ W.T + bias``, any stored form)   weight_norms_sq: [out] float64 ||W_i||^2
    a: [r, in] in the base's input dtype and device   b: [out, r]   magnitude: [out] (PEFT lora_magnitude_vector)
    -> [out] float32. Raises ValueError when a row's norm is zero (PEFT would divide by zero too).
    """
    aw = base(a).double()  # [r, out] = A @ W.T + bias
    bias = getattr(base, "bias", None)
    if bias is not None:
        aw = aw - bias.double()
    a64, b64 = a.double(), b.to(a.device).double()
    cross = (b64 * aw.T).sum(dim=1)  # [out] <W_i, (B A)_i>
    lora_sq = ((b64 @ (a64 @ a64.T)) * b64).sum(dim=1)  # [out] ||(B A)_i||^2
    norm = (weight_norms_sq.to(a.device) + 2.0 * scale * cross + scale * scale * lora_sq).clamp_min(0.0).sqrt()
    g = magnitude.to(a.device).double() / norm
    if not bool(torch.isfinite(g).all()):
        raise ValueError("DoRA: a row of W + scale * B A has norm 0, so its magnitude cannot be applied")
    return (g - 1.0).float()


def apply_dora(y: torch.Tensor, bias: torch.Tensor | None, factors: torch.Tensor, dora: DoraTokens) -> None:
    """y[t] += factors[row_t] * (y[t] - bias) for every DoRA token t, in place (see the module docstring).

    y: [T, out], holding base(x) + the LoRA term   bias: [out] or None   factors: [N+1, out], the layer's B pool
    whose DoRA rows hold g - 1   dora: the spans (sliced in place) and gathered tokens/rows ([D] int64) of the step.
    """
    for start, end, row in dora.spans:
        span = y[start:end]  # [n, out], a view: rescaled in place
        span.addcmul_(factors[row], span if bias is None else span - bias)
    if dora.tokens is not None and dora.rows is not None:
        picked = y.index_select(0, dora.tokens)  # [D, out]
        unbiased = picked if bias is None else picked - bias
        y.index_copy_(0, dora.tokens, torch.addcmul(picked, factors.index_select(0, dora.rows), unbiased))
