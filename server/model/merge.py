"""Folding one adapter into the frozen base weights (``W' = W + s B A``) and back, and the low-rank corrections that
let every other row run on the folded weights (``server.engine.merge_control`` decides when).

Only the modules the adapter adapts are rewritten. Their weights from before are kept aside while it is merged, so
unmerging restores them bit for bit (no drift over many cycles):
- a CPU base packed for oneDNN (``PackedLinear``): ``prepare_merge`` unpacks W, adds the delta in float32 and packs
  the sum, on any thread (the engine's reader thread: about 6 ms a module of SmolLM2-135M on one core, 1.3 s for an
  adapter on all 210 projections), while the engine keeps serving; ``apply_merge`` then swaps the packed tensors in
  between two steps (microseconds), and ``unmerge_adapter`` swaps the old ones back. Memory: the adapted modules'
  weights once more while merged (or prepared).
- a plain ``nn.Linear`` (CUDA, or a CPU without packing): ``apply_merge`` adds the delta in place and keeps a host
  copy of W, copied back by ``unmerge_adapter``: host memory only, no accelerator memory is spent on it.
Any other stored form (a quantized base) is refused: ``merge_refusal`` says why.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from server.adapters.checkpoint import AdapterWeights, LayerWeights
from server.adapters.peft_config import LoraSpec
from server.model.lora_model import LoraModel
from server.model.packed_linear import PackedLinear, pack_weight
from server.model.quantize import is_quantized


class StaleMergeError(RuntimeError):
    """A prepared merge was built from base weights that have changed since (another merge): prepare it again."""


@dataclass
class PreparedMerge:
    """An adapter ready to fold in: its weights, and for each packed module (packed W it was built from, packed
    W + s B A)."""

    weights: AdapterWeights
    packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class MergedWeights:
    """What ``apply_merge`` changed: module name -> the module's weight from before (a packed tensor for a
    ``PackedLinear``, a host copy of W for an ``nn.Linear``)."""

    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Memory held aside while merged."""
        return sum(t.numel() * t.element_size() for t in self.saved.values())


def lora_refusal(weights: AdapterWeights) -> str | None:
    """Why ``weights`` is not a plain low-rank delta ``s B A`` that can be merged or corrected, or None when it is."""
    if weights.spec.use_dora or any(lw.magnitude is not None for lw in weights.layers.values()):
        return "a DoRA adapter rescales W + s B A by norms that depend on W: it is served unmerged only"
    if weights.spec.peft_type != "LORA":
        return f"a {weights.spec.peft_type} adapter is served unmerged only"
    return None


def merge_refusal(model: LoraModel, weights: AdapterWeights) -> str | None:
    """Why ``weights`` cannot be folded into ``model``'s base weights, or None when it can."""
    reason = lora_refusal(weights)
    if reason is not None:
        return reason
    for name in weights.layers:
        base = model.layers[name].base
        if (type(base) is not PackedLinear and type(base) is not nn.Linear) or is_quantized(base):
            return f"the base of {name} is stored quantized ({type(base).__name__}): only dense weights are merged"
    return None


@torch.no_grad()
def prepare_merge(model: LoraModel, weights: AdapterWeights, single_thread: bool = False) -> PreparedMerge:
    """The slow half of a merge, safe beside running steps (it only reads the base weights): the packed modules'
    ``W + scale * B @ A``, packed. Raises ValueError (``merge_refusal``) for an adapter that cannot be merged.

    single_thread: on a thread of its own, use one core (OpenMP's thread count is per thread; on another parallel
    backend it is left alone), so the engine's steps keep theirs."""
    reason = merge_refusal(model, weights)
    if reason is not None:
        raise ValueError(reason)
    if single_thread and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)
    prepared = PreparedMerge(weights)
    for name, lw in weights.layers.items():
        base = model.layers[name].base
        if isinstance(base, PackedLinear):
            source = base.packed
            prepared.packed[name] = (source, pack_weight(_plus_delta(source.to_dense(), lw)))
    return prepared


@torch.no_grad()
def apply_merge(model: LoraModel, prepared: PreparedMerge) -> MergedWeights:
    """``W <- W + scale * B @ A`` for every module the adapter adapts: packed modules take their prepared weight, plain
    linears are summed in place (float32 sum, stored in W's dtype). Run between steps.

    Either every module is merged or, when one fails, the ones done are restored before the error propagates
    (``StaleMergeError`` when a packed module no longer holds the weight the preparation read).
    """
    merged = MergedWeights()
    try:
        for name, lw in prepared.weights.layers.items():
            base = model.layers[name].base
            if isinstance(base, PackedLinear):
                source, summed = prepared.packed[name]
                if base.packed is not source:
                    raise StaleMergeError(f"the base weight of {name} changed since the merge was prepared")
                merged.saved[name] = source
                base.packed = summed
            else:
                assert isinstance(base, nn.Linear) and not is_quantized(base), "checked by prepare_merge"
                merged.saved[name] = base.weight.detach().to("cpu", copy=True)
                base.weight.copy_(_plus_delta(base.weight, lw))
    except BaseException:
        unmerge_adapter(model, merged)
        raise
    return merged


def merge_adapter(model: LoraModel, weights: AdapterWeights) -> MergedWeights:
    """``prepare_merge`` and ``apply_merge`` at once."""
    return apply_merge(model, prepare_merge(model, weights))


@torch.no_grad()
def unmerge_adapter(model: LoraModel, merged: MergedWeights) -> None:
    """Put back the weights ``merge_adapter`` replaced, exactly; ``merged`` is emptied."""
    for name, saved in merged.saved.items():
        base = model.layers[name].base
        if isinstance(base, PackedLinear):
            base.packed = saved
        else:
            assert isinstance(base, nn.Linear)
            base.weight.copy_(saved, non_blocking=False)
    merged.saved.clear()


def _plus_delta(w: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
    """w [out, in] + scale * b [out, r] @ a [r, in], summed in float32 on w's device, returned in w's dtype."""
    a = lw.a.to(w.device, torch.float32)
    b = lw.b.to(w.device, torch.float32)
    return torch.addmm(w.float(), b, a, alpha=lw.scale).to(w.dtype)


def correction_weights(own: AdapterWeights | None, merged: AdapterWeights) -> AdapterWeights:
    """The adapter a row on ``own`` (None: the base model) needs while ``merged`` is folded into the base weights:
    ``s_own B_own A_own - s_m B_m A_m`` in every module either adapts, still low-rank (ranks add).

    Per module: A = cat(A_own * s_own, A_m * -s_m) [r_own + r_m, in], B = cat(B_own, B_m, dim=1) [out, r_own + r_m],
    scale 1 (the scales are folded into A in float32, stored in the parts' dtype). A module only one of them adapts
    gets that one's part alone. Both must be plain LoRA (``merge_refusal``: a DoRA row has no low-rank correction).
    """
    for weights in (own, merged):
        reason = None if weights is None else lora_refusal(weights)
        if reason is not None:
            raise ValueError(reason)
    own_layers = own.layers if own is not None else {}
    layers: dict[str, LayerWeights] = {}
    for name in sorted(set(own_layers) | set(merged.layers)):
        pieces = [(lw, sign) for lw, sign in ((own_layers.get(name), 1.0), (merged.layers.get(name), -1.0)) if lw]
        dtype = pieces[0][0].a.dtype
        a = torch.cat([lw.a.float() * (sign * lw.scale) for lw, sign in pieces]).to(dtype)
        b = torch.cat([lw.b.float() for lw, _ in pieces], dim=1).to(dtype)
        layers[name] = LayerWeights(a.contiguous(), b.contiguous(), 1.0)
    rank = max(lw.a.shape[0] for lw in layers.values())
    spec = LoraSpec(r=rank, lora_alpha=float(rank), use_rslora=False, target_modules=tuple(sorted(layers)),
                    rank_pattern={}, alpha_pattern={},
                    base_model_name_or_path=merged.spec.base_model_name_or_path)  # fmt: skip
    return AdapterWeights(spec, layers)
