"""The frozen base model's linears in their stored form (``--quantize``), and their dense weights when an adapter
needs them.

``--quantize none|int8|nf4`` stores every linear of the decoder (not the embeddings, not the output head: the
libraries' own defaults, kept so PEFT's reference over a ``from_pretrained(..., quantization_config=...)`` model is
the same model) in a compact form; LoRA stays unmerged in the compute dtype on top, QLoRA's inference path:

- ``nf4``: bitsandbytes ``Linear4bit``, NF4 in blocks of 64 with float32 absmax (no double quantization): the format
  QLoRA trains on, loaded exactly as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=<dtype>)`` does. 0.5 byte per weight + 4 bytes per 64 weights.
- ``int8``: torchao ``Int8WeightOnlyConfig`` (``TorchAoConfig``), int8 per output row, activations left in float:
  1 byte per weight + a scale and a zero point per row. Chosen over bitsandbytes' ``Linear8bitLt`` by speed on the
  CPU at the embedded model's decode shapes (hidden 576, intermediate 1536): torchao took 0.65-0.86x bitsandbytes'
  time per projection at 1-8 rows in float32 (0.86-1.11x at 32 rows; loadtests/bench_quantize.py,
  docs/benchmarks.md), and it is weight-only, while ``Linear8bitLt`` is LLM.int8 (activations quantized as well).

``dense_weight`` gives the ``[out, in]`` weight a base linear computes with, whatever form it is stored in: DoRA's
column norms (PEFT: ``dequantize_module_weight``) are taken over it.
"""

import copy
from typing import Any

import torch
from torch import nn

QUANTIZE_METHODS = ("none", "int8", "nf4")
# The dtypes bitsandbytes' 4-bit and torchao's int8 kernels compute in (all three ran on this CPU).
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantization_config(method: str, dtype: torch.dtype) -> Any:
    """transformers' ``quantization_config`` that stores the base linears as ``method`` computing in ``dtype``
    (None for ``none``). Raises ValueError for an unknown method or a dtype the library cannot compute in."""
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"unsupported quantize method {method!r}; use {', '.join(QUANTIZE_METHODS)}")
    if method == "none":
        return None
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"quantize={method} computes in float32, float16 or bfloat16, not {dtype}")
    if method == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    # set_inductor_config=False: torchao would otherwise change torch.compile's global settings (not the numerics).
    return TorchAoConfig(quant_type=Int8WeightOnlyConfig(set_inductor_config=False))


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored in a quantized form (a tensor subclass or a bitsandbytes parameter)
    rather than a plain dense tensor."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter)


@torch.no_grad()
def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``module`` applies, ``[out, in]``, in float32 (a copy for stored forms that are not dense).

    bitsandbytes NF4 is dequantized by bitsandbytes, torchao int8 by torchao: what PEFT's
    ``dequantize_module_weight`` does.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if type(weight).__name__ == "Params4bit":
            return _dequantize_4bit(weight)
        if type(weight).__module__.startswith("torchao."):
            return weight.dequantize().float()
        if weight.dim() == 2 and not is_quantized(module):
            return weight.float()
    raise TypeError(f"{type(module).__name__} has no dense [out, in] weight to read")


def _dequantize_4bit(weight: Any) -> torch.Tensor:
    import bitsandbytes as bnb

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # On CPUs with AVX512-BF16, Linear4bit repacks its weight at the first forward for its CPU kernel (absmax
        # rounded to bfloat16); bitsandbytes' inverse restores the layout dequantize_4bit reads. It edits the state
        # it is given, so it works on a copy.
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return bnb.functional.dequantize_4bit(data, state).float()


def stored_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers of ``model`` take as stored: a quantized weight counts its packed data and
    scales, a tied weight once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    state = getattr(tensor, "quant_state", None)
    if type(tensor).__name__ == "Params4bit" and state is not None:
        return tensor.data.nbytes + _state_bytes(state)
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()  # a wrapper subclass (torchao): the tensors it holds
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _state_bytes(state: Any) -> int:
    """A bitsandbytes QuantState's tensors: absmax, the 16-entry code (and the nested statistics when used)."""
    total = sum(t.nbytes for t in vars(state).values() if isinstance(t, torch.Tensor))
    nested = getattr(state, "state2", None)
    return total + (_state_bytes(nested) if nested is not None else 0)
