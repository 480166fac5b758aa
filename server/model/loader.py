"""Loading a frozen Hugging Face causal LM from a local folder; device, dtype and stored form chosen once."""

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from server.model.dtype_choice import auto_dtype, read_cpu_flags
from server.model.quantize import quantization_config, stored_bytes

log = logging.getLogger(__name__)

# Families whose decoder layers name their projections q/k/v/o_proj and gate/up/down_proj, tested here.
TESTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and on CPUs with hardware bfloat16 dot products, else float32
    (``server.model.dtype_choice``; the choice and its reason are logged)."""
    if dtype == "auto":
        chosen, reason = auto_dtype(device, read_cpu_flags() if device.type == "cpu" else ())
        log.info("--dtype auto: %s, because %s", str(chosen).removeprefix("torch."), reason)
        return chosen
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, {', '.join(_DTYPES)}") from None


def set_cpu_threads(threads: int | None) -> None:
    """Threads of torch's CPU math (oneDNN GEMMs, the C LoRA kernel's tile loop); None keeps torch's default, one per
    core. Ray replicas pass what Ray reserved for them: torch cannot know a process shares the machine."""
    if threads is not None:
        torch.set_num_threads(threads)


def load_base_model(
    path: str | os.PathLike[str], device: str = "auto", dtype: str = "auto", quantize: str = "none"
) -> PreTrainedModel:
    """Load the causal LM in the local HF folder ``path``, frozen (eval mode, no gradients), on ``device``.

    quantize: ``none``, or ``int8``/``nf4``: the decoder's linears stored quantized, computing in ``dtype``
    (server/model/quantize.py), each weight quantized as it is read, so the float model is never built whole.
    Never downloads anything: the folder must hold the config and weights.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if quantize != "none":
        return _load_quantized(folder, config, torch_device, torch_dtype, quantize)
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=torch_dtype, local_files_only=True, device_map=None
    )
    # transformers wraps PreTrainedModel.to with functools.wraps, whose stub loses the bound `self`.
    model.to(torch_device)  # type: ignore[arg-type]
    return _frozen(model)


def _load_quantized(
    folder: Path, config: Any, device: torch.device, dtype: torch.dtype, quantize: str
) -> PreTrainedModel:
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"{str(folder)!r} holds an already quantized model (quantization_config in its config.json); "
            f"quantize={quantize} quantizes a float checkpoint as it loads it"
        )
    # The quantizers place each weight as they quantize it (a quantized model cannot be moved with .to afterwards).
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        config=config,
        dtype=dtype,
        local_files_only=True,
        device_map={"": str(device)},
        quantization_config=quantization_config(quantize, dtype),
    )
    if device.type == "cpu":
        _own_float_weights(model)
    log.info("base model linears stored as %s: %.1f MiB of weights", quantize, stored_bytes(model) / 2**20)
    return _frozen(model)


@torch.no_grad()
def _own_float_weights(model: PreTrainedModel) -> None:
    """Copy the weights left in float (embeddings, norms, output head) out of the safetensors file mapping they were
    read into, so the mapping closes: quantizing read every float weight of the file, and its pages would otherwise
    stay in the process's resident memory as long as any tensor views the file (docs/benchmarks.md)."""
    for param in model.parameters():
        if type(param) is nn.Parameter:  # quantized weights are subclasses, in memory of their own already
            param.data = param.data.clone()


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model
