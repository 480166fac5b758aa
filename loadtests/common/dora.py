"""DoRA adapters for the tests and benchmarks: PEFT's own DoRA saves with magnitudes moved off their initial value,
and DoRA twins of plain LoRA saves (same A, B and config, plus magnitudes)."""

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loadtests.common.factories import save_peft_adapter

MAGNITUDE = ".lora_magnitude_vector"
_PREFIX = "base_model.model."


def scale_magnitudes(folder: Path, seed: int, spread: float = 0.5) -> Path:
    """Multiply every lora_magnitude_vector of the save in ``folder`` by factors drawn from U(1 - spread, 1 + spread).

    PEFT starts the magnitude at ``||W + scale * B A||_row``, where DoRA equals plain LoRA; training moves it, and so
    does this, so a server that ignored the magnitude (or got the norms wrong) visibly fails."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for key, t in tensors.items():
        if key.endswith(MAGNITUDE):
            tensors[key] = t * (1 - spread + 2 * spread * torch.rand(t.shape, generator=gen, dtype=t.dtype))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def save_dora_adapter(base: nn.Module, folder: Path, seed: int, spread: float = 0.5, **lora_kwargs: Any) -> Path:
    """``save_peft_adapter(..., use_dora=True)`` (PEFT computes the magnitudes), then ``scale_magnitudes``."""
    save_peft_adapter(base, folder, seed, use_dora=True, **lora_kwargs)
    return scale_magnitudes(folder, seed, spread)


def dora_twin(plain: Path, out: Path, base: nn.Module, seed: int, spread: float = 0.5) -> Path:
    """A DoRA save of the plain LoRA save ``plain`` on ``base``: the same A, B and config with ``use_dora`` true and,
    per module, magnitude ``||W + scale * B A||_row`` times U(1 - spread, 1 + spread). Plain saves with a
    rank_pattern or alpha_pattern are refused (one scale per adapter here)."""
    config = json.loads((plain / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("dora_twin takes adapters with one rank and alpha")
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    tensors = load_file(str(plain / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key[len(_PREFIX) : -len(".lora_A.weight")]
        a, b = tensors[key].float(), tensors[f"{_PREFIX}{module}.lora_B.weight"].float()
        weight = base.get_submodule(module).weight.detach().float()
        norm = torch.linalg.vector_norm(weight + scale * (b @ a), dim=1)
        factors = 1 - spread + 2 * spread * torch.rand(norm.shape, generator=gen)
        tensors[f"{_PREFIX}{module}{MAGNITUDE}"] = (norm * factors).to(tensors[key].dtype)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}, indent=2, sort_keys=True))
    return out


def without_dora(dora: Path, out: Path) -> Path:
    """The plain LoRA save with ``dora``'s A, B and config (magnitudes dropped, ``use_dora`` false)."""
    shutil.copytree(dora, out)
    tensors = {k: v for k, v in load_file(str(dora / "adapter_model.safetensors")).items() if not k.endswith(MAGNITUDE)}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dora / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}, indent=2, sort_keys=True))
    return out
