"""Loading a frozen Hugging Face causal LM from a local folder; device and dtype chosen once."""

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

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
    """``auto`` is float32 on CPU (fast and exact there) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, {', '.join(_DTYPES)}") from None


def load_base_model(path: str | os.PathLike[str], device: str = "auto", dtype: str = "auto") -> PreTrainedModel:
    """Load the causal LM in the local HF folder ``path``, frozen (eval mode, no gradients), on ``device``.

    Never downloads anything: the folder must hold the config and weights.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=torch_dtype, local_files_only=True, device_map=None
    )
    # transformers wraps PreTrainedModel.to with functools.wraps, whose stub loses the bound `self`.
    model.to(torch_device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return model
