"""Reading a PEFT LoRA save folder (``adapter_config.json`` + ``adapter_model.safetensors``) into host tensors.

Everything is validated before anything is returned: the caller (the slot cache) only evicts once a read succeeded.
Pickle files are never opened: a folder that holds one is refused outright.
"""

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from server.adapters.adalora import ADALORA_SUFFIXES, to_lora_layout
from server.adapters.archive import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from server.adapters.config_json import MAX_CONFIG_BYTES
from server.adapters.errors import AdapterFormatError, AdapterMismatchError
from server.adapters.peft_config import LoraSpec, parse_lora_config

ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_magnitude_vector": "m"}  # m: DoRA only


@dataclass(frozen=True)
class TargetableModules:
    """What an adapter may adapt in the loaded base model (plain data, built by the model layer).

    shapes:       wrapped module name -> (in_features, out_features); only these can carry LoRA weights
    module_names: every module name of the base model, for PEFT's target matching
    linear_names: the base's ``nn.Linear`` modules except the output head, what PEFT's "all-linear" means
    """

    shapes: Mapping[str, tuple[int, int]]
    module_names: tuple[str, ...]
    linear_names: tuple[str, ...]


@dataclass(frozen=True)
class LayerWeights:
    """One adapted module: a [r, in] (lora_A.weight), b [out, r] (lora_B.weight), scale = alpha/r or alpha/sqrt(r);
    magnitude [out] (DoRA's lora_magnitude_vector) or None for plain LoRA."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter's host copy: the spec it was saved with and the weights of every module it adapts."""

    spec: LoraSpec
    layers: Mapping[str, LayerWeights]

    @property
    def rank(self) -> int:
        return max(w.a.shape[0] for w in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size() for w in self.layers.values())

    def pin_memory(self) -> "AdapterWeights":
        """A copy in page-locked host memory, so copies into accelerator slots can run asynchronously."""
        pinned = {
            k: LayerWeights(
                w.a.pin_memory(), w.b.pin_memory(), w.scale, None if w.magnitude is None else w.magnitude.pin_memory()
            )
            for k, w in self.layers.items()
        }
        return AdapterWeights(self.spec, pinned)


def read_adapter(
    folder: str | os.PathLike[str], modules: TargetableModules, max_rank: int, dtype: torch.dtype
) -> AdapterWeights:
    """Read and validate the PEFT LoRA save in ``folder`` against the base model; weights converted to ``dtype``.

    Raises AdapterFormatError, UnsupportedAdapterError or AdapterMismatchError with a message naming the problem.
    """
    path = Path(folder)
    if not path.is_dir():
        raise AdapterFormatError(f"adapter folder {str(path)!r} does not exist")
    pickles = sorted(p.name for p in path.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterFormatError(
            f"pickle files are never loaded (they can run code): found {', '.join(pickles)}; "
            f"save the adapter with safetensors ({WEIGHTS_FILE})"
        )
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing")
    if not weights_path.is_file():
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing")
    with config_path.open("rb") as f:  # one byte over the cap is enough for parse_lora_config to refuse it
        spec = parse_lora_config(f.read(MAX_CONFIG_BYTES + 1))
    if spec.max_rank > max_rank:
        raise AdapterMismatchError(f"adapter rank {spec.max_rank} is above this server's maximum rank {max_rank}")
    targets = _resolve_targets(spec, modules)
    tensors = _read_tensors(weights_path, ADALORA_SUFFIXES if spec.peft_type == "ADALORA" else _SUFFIXES)
    targets = to_lora_layout(spec, targets, tensors)  # AdaLoRA: a = lora_A * lora_E; rank-0 modules dropped
    layers: dict[str, LayerWeights] = {}
    for name in targets:
        parts = tensors.pop(name, {})
        missing = sorted({"a", "b"} - parts.keys())
        if missing:
            kinds = ", ".join(f"lora_{k.upper()}" for k in missing)
            raise AdapterFormatError(f"missing tensors for {name}: {kinds} (the config targets this module)")
        layer = _checked_layer(name, parts["a"], parts["b"], spec, modules.shapes[name], dtype)
        layers[name] = _with_magnitude(layer, name, parts.get("m"), spec.use_dora)
    if tensors:
        extra = sorted(tensors)
        raise AdapterFormatError(
            f"extra tensors for modules the config does not target: {', '.join(extra[:5])}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )
    return AdapterWeights(spec, layers)


def _resolve_targets(spec: LoraSpec, modules: TargetableModules) -> list[str]:
    targets = spec.targets(modules.module_names, modules.linear_names)
    if not targets:
        shown = repr(spec.target_modules)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise AdapterMismatchError(f"target_modules {shown} match no module of the base model")
    unserved = [name for name in targets if name not in modules.shapes]
    if unserved:
        served = sorted({name.rsplit(".", 1)[-1] for name in modules.shapes})
        raise AdapterMismatchError(
            f"the adapter targets modules this server does not adapt: {', '.join(unserved[:5])}; "
            f"LoRA is served on {', '.join(served)}"
        )
    return targets


def _read_tensors(weights_path: Path, suffixes: Mapping[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"a": lora_A.weight, "b": lora_B.weight} as stored in the file."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for key in f.keys():
                module, kind = _parse_key(key, suffixes)
                out.setdefault(module, {})[kind] = f.get_tensor(key)
    except SafetensorError as exc:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    return out


def _parse_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str]:
    for suffix, kind in suffixes.items():
        if key.startswith(_PREFIX) and key.endswith(suffix):
            return key[len(_PREFIX) : -len(suffix)], kind
    if suffixes is ADALORA_SUFFIXES:
        raise AdapterFormatError(
            f"unexpected tensor {key!r}: an AdaLoRA save holds only '{_PREFIX}<module>.lora_A', '.lora_B', '.lora_E'"
        )
    raise AdapterFormatError(
        f"unexpected tensor {key!r}: a LoRA save holds only '{_PREFIX}<module>.lora_A.weight', '.lora_B.weight' "
        "(and DoRA's '.lora_magnitude_vector')"
    )


def _checked_layer(
    name: str, a: torch.Tensor, b: torch.Tensor, spec: LoraSpec, shape: tuple[int, int], dtype: torch.dtype
) -> LayerWeights:
    in_features, out_features = shape
    for kind, t in (("lora_A", a), ("lora_B", b)):
        if t.dtype not in ACCEPTED_DTYPES:
            raise AdapterFormatError(f"{name}.{kind} has dtype {t.dtype}; accepted: float16, bfloat16, float32")
        if t.dim() != 2:
            raise AdapterFormatError(f"{name}.{kind} has {t.dim()} dimensions; LoRA weights are matrices")
    r = spec.rank_for(name)
    if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
        raise AdapterMismatchError(
            f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base model; expected "
            f"({r}, {in_features}) / ({out_features}, {r}) for rank {r}"
        )
    for kind, t in (("lora_A", a), ("lora_B", b)):
        if not bool(torch.isfinite(t).all()):
            raise AdapterFormatError(f"{name}.{kind} contains NaN or infinite values")
    scale = spec.scale_for(name)
    if not math.isfinite(scale):
        raise AdapterFormatError(f"{name}: scale {scale} is not finite")
    return LayerWeights(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scale)


def _with_magnitude(layer: LayerWeights, name: str, magnitude: torch.Tensor | None, use_dora: bool) -> LayerWeights:
    """``layer`` with DoRA's lora_magnitude_vector [out], checked and kept in float32 (``server.lora.dora`` divides
    it by the norms in float64 when a slot is written); required exactly when the config says ``use_dora``."""
    if magnitude is None:
        if use_dora:
            raise AdapterFormatError(f"missing tensor for {name}: lora_magnitude_vector (the config says use_dora)")
        return layer
    if not use_dora:
        raise AdapterFormatError(f"{name}.lora_magnitude_vector is a DoRA tensor but the config says use_dora=false")
    if magnitude.dtype not in ACCEPTED_DTYPES:
        raise AdapterFormatError(
            f"{name}.lora_magnitude_vector has dtype {magnitude.dtype}; accepted: float16, bfloat16, float32"
        )
    out_features = layer.b.shape[0]
    if tuple(magnitude.shape) != (out_features,):
        raise AdapterMismatchError(
            f"{name}: lora_magnitude_vector {tuple(magnitude.shape)} does not fit the base model; expected "
            f"({out_features},), one magnitude per output feature"
        )
    if not bool(torch.isfinite(magnitude).all()):
        raise AdapterFormatError(f"{name}.lora_magnitude_vector contains NaN or infinite values")
    return replace(layer, magnitude=magnitude.float().contiguous())
