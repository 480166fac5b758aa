"""AdaLoRA saves (``peft_type: "ADALORA"``) served as plain LoRA, equal to peft 0.21's ``SVDLinear``.

peft's forward for one AdaLoRA module is ``y += x @ (lora_A * lora_E).T @ lora_B.T * scaling / (ranknum + 1e-5)``
with lora_A [r, in], lora_E [r, 1] (the singular values), lora_B [out, r]. Folding E into A gives LoRA's layout,
``a = lora_A * lora_E`` and ``b = lora_B``, so the adapter runs on the same kernels as any LoRA adapter.

What peft computes once a pruned save is loaded (``PeftModel.from_pretrained`` -> ``resize_modules_by_rank_pattern``):
- r: the kept rank, ``sum(mask)`` of the module's ``rank_pattern["<module>.lora_E"]`` boolean mask (``init_r``
  masks, saved by the rank allocator for every adapted module), or ``init_r`` when the config has no rank_pattern;
  the save holds exactly r rows, and a module pruned to rank 0 holds empty tensors and adds nothing.
- ranknum: ``init_r``, not the kept rank (the resize copies the old value back), computed in float32.
- scaling: ``lora_alpha``, or the kept rank when lora_alpha <= 0 (``update_layer``).
So the LoRA scale is ``scaling / float32(init_r + 1e-5)``. peft ignores ``r`` (it warns), ``use_rslora`` and
``alpha_pattern`` for AdaLoRA: the last two are refused rather than silently dropped. ``target_r``, ``tinit``,
``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight`` and ``total_step`` drive training only.

The config part is torch-free; ``to_lora_layout`` takes the tensors ``checkpoint`` read.
"""

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from server.adapters.errors import AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from server.adapters.peft_config import LoraSpec, parse_lora_config

if TYPE_CHECKING:
    import torch

# Tensor name suffixes of an AdaLoRA save (peft stores the ParameterDict entries without ".weight").
ADALORA_SUFFIXES = {".lora_A": "a", ".lora_B": "b", ".lora_E": "e"}
_MASK_SUFFIX = ".lora_E"
_ACCEPTED_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")  # as in checkpoint.ACCEPTED_DTYPES
_INIT_R_DEFAULT = 12  # AdaLoraConfig.init_r


@dataclass(frozen=True)
class AdaLoraSpec(LoraSpec):
    """A LoraSpec whose ranks come from AdaLoRA's pruning masks and whose scale is peft's ``scaling / ranknum``.

    r is ``init_r``; ranks: module name -> kept rank (empty: no pruning, every module keeps ``init_r``).
    """

    init_r: int = _INIT_R_DEFAULT
    ranks: Mapping[str, int] = field(default_factory=dict, hash=False)

    def rank_for(self, module_name: str) -> int:
        return self.ranks.get(module_name, self.init_r)

    def alpha_for(self, module_name: str) -> float:
        return self.lora_alpha

    def scale_for(self, module_name: str) -> float:
        scaling = self.lora_alpha if self.lora_alpha > 0 else float(self.rank_for(module_name))
        return scaling / _f32(_f32(float(self.init_r)) + _f32(1e-5))

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values()) if self.ranks else self.init_r


def parse_adalora_config(cfg: dict[str, object]) -> AdaLoraSpec:
    """An AdaLoRA ``adapter_config.json`` (already a JSON object) -> AdaLoraSpec.

    The fields AdaLoRA shares with LoRA (targets, layer filters, bias, modules_to_save, inits...) are validated by
    ``parse_lora_config``. Raises AdapterFormatError or UnsupportedAdapterError naming the field.
    """
    init_r = cfg.get("init_r", _INIT_R_DEFAULT)
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r <= 0:
        raise AdapterFormatError(f"init_r={_show(init_r)}: AdaLoRA's initial rank must be a positive integer")
    for name in ("use_dora", "loftq_config"):  # AdaLoraConfig itself refuses these
        if not _off(cfg.get(name)):
            raise UnsupportedAdapterError(f"{name}={_show(cfg[name])}: peft's AdaLoRA does not support it")
    for name in ("use_rslora", "alpha_pattern"):
        if not _off(cfg.get(name)):
            raise UnsupportedAdapterError(
                f"{name}={_show(cfg[name])} is not applied by peft's AdaLoRA (its scale is lora_alpha / init_r), "
                "so it is refused rather than ignored; accepted: false / {}"
            )
    ranks = _ranks(cfg.get("rank_pattern"), init_r)
    # A LoRA config with AdaLoRA's initial rank; AdaLoRA's rank_pattern (masks) replaces LoRA's (rank per regex).
    overrides = {"peft_type": "LORA", "r": init_r, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    lora = parse_lora_config(cfg | overrides | {"use_dora": False})
    shared = {f.name: getattr(lora, f.name) for f in fields(LoraSpec) if f.init}
    return AdaLoraSpec(**(shared | {"peft_type": "ADALORA"}), init_r=init_r, ranks=ranks)


def _ranks(masks: object, init_r: int) -> dict[str, int]:
    """rank_pattern {"<module>.lora_E": [bool] * init_r} -> {module: kept rank}; null or {} -> {}."""
    if masks is None:
        return {}
    if not isinstance(masks, dict):
        raise AdapterFormatError(f"rank_pattern={_show(masks)}: AdaLoRA's rank_pattern maps modules to rank masks")
    ranks: dict[str, int] = {}
    for key, mask in masks.items():
        if not isinstance(key, str) or not key.endswith(_MASK_SUFFIX) or len(key) == len(_MASK_SUFFIX):
            raise AdapterFormatError(
                f"rank_pattern key {_show(key)}: AdaLoRA's keys are '<module>.lora_E', as peft saves them"
            )
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(m, bool) for m in mask):
            raise AdapterFormatError(
                f"rank_pattern[{_show(key)}]={_show(mask)}: must be a list of {init_r} booleans (init_r), "
                "true for each kept rank"
            )
        ranks[key[: -len(_MASK_SUFFIX)]] = sum(mask)
    if ranks and not any(ranks.values()):
        raise UnsupportedAdapterError(
            "rank_pattern prunes every module to rank 0: the adapter equals the base model; serve the base instead"
        )
    return ranks


def to_lora_layout(spec: LoraSpec, targets: Sequence[str], tensors: dict[str, dict[str, "torch.Tensor"]]) -> list[str]:
    """Rewrite an AdaLoRA adapter's tensors in place into LoRA's layout; return the targets that carry weights.

    tensors: module -> {"a": lora_A [r, in], "e": lora_E [r, 1], "b": lora_B [out, r]} as stored; each target's
    entry becomes {"a": lora_A * lora_E [r, in] float32, "b": lora_B} (``checkpoint`` then checks shapes and values
    as for LoRA). Modules pruned to rank 0 are dropped (their tensors must be empty). A plain LoRA spec passes
    through. Raises AdapterFormatError / AdapterMismatchError naming the module.
    """
    if not isinstance(spec, AdaLoraSpec):
        return list(targets)
    if spec.ranks:  # peft's rank allocator saves a mask for every adapted module, and only for those
        targeted = set(targets)
        stray = [m for m in spec.ranks if m not in targeted]
        if stray:
            raise AdapterMismatchError(f"rank_pattern names modules the adapter does not target: {_few(stray)}")
        unmasked = [m for m in targets if m not in spec.ranks]
        if unmasked:
            raise AdapterFormatError(f"rank_pattern has no mask for targeted modules: {_few(unmasked)}")
    served = []
    for name in targets:
        parts = tensors.get(name, {})
        for kind, t in parts.items():
            if str(t.dtype) not in _ACCEPTED_DTYPES:
                accepted = "float16, bfloat16, float32"
                raise AdapterFormatError(f"{name}.lora_{kind.upper()} has dtype {t.dtype}; accepted: {accepted}")
        r = spec.rank_for(name)
        if r == 0:
            full = [f"lora_{k.upper()}" for k, t in sorted(parts.items()) if t.numel()]
            if full:
                raise AdapterMismatchError(f"{name} is pruned to rank 0 but {', '.join(full)} are not empty")
            tensors.pop(name, None)
            continue
        missing = sorted({"a", "b", "e"} - parts.keys())
        if missing:
            kinds = ", ".join(f"lora_{k.upper()}" for k in missing)
            raise AdapterFormatError(f"missing tensors for {name}: {kinds} (the config targets this module)")
        a, e = parts["a"], parts["e"]
        if a.dim() != 2 or a.shape[0] != r or tuple(e.shape) != (r, 1):
            raise AdapterMismatchError(
                f"{name}: lora_A {tuple(a.shape)} / lora_E {tuple(e.shape)} do not fit rank {r}; expected (r, in) "
                f"/ ({r}, 1)"
            )
        if not bool(e.isfinite().all()):
            raise AdapterFormatError(f"{name}.lora_E contains NaN or infinite values")
        tensors[name] = {"a": a.float() * e.float(), "b": parts["b"]}
        served.append(name)
    return served


def _f32(x: float) -> float:
    """``x`` rounded to float32: peft holds ranknum in a float32 tensor."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def _off(value: object) -> bool:
    return value is None or value is False or value == [] or value == {}


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _show(value: object) -> str:
    """``repr(value)`` cut to 120 characters (a refusal never echoes a megabyte back, nor fails on a huge int)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's str limit (only from a dict: JSON literals are bounded)
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= 120 else text[:120] + "..."
