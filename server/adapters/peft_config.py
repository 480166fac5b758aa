"""PEFT ``adapter_config.json`` (LoRA, as peft 0.21 saves it) -> ``LoraSpec``: which modules an adapter adapts, and
at what rank and scale.

Torch-free bookkeeping. Target matching mirrors ``peft.tuners.tuners_utils.check_target_module_exists`` and rank/alpha
lookup mirrors ``peft.utils.other.get_pattern_key``; tests/unit/test_peft_config.py checks both against the
installed peft.
Uploaded regexes are matched with RE2 in linear time (``module_patterns``) and the JSON is parsed within bounds
(``config_json``), so no config can stall the process or escape as anything but an AdapterError (HTTP 422).
Keys this module does not know (``revision``, ``megatron_config``, ... from any peft version) are ignored.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeGuard

from server.adapters import module_patterns as mp
from server.adapters.config_json import load_config_json
from server.adapters.errors import AdapterFormatError, UnsupportedAdapterError

ALL_LINEAR = "all-linear"
# PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ rewrite the base weights when the adapter is created. Unless the save was
# converted back (save_pretrained(path_initial_model_for_weight_conversion=...), which writes init_lora_weights=true)
# the adapter only fits that rewritten base, so served on the original base it would silently give wrong outputs.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _off(value: object) -> bool:
    return value is None or value is False or value == [] or value == {}


def _is_null(value: object) -> bool:
    return value is None


# field -> (peft's default, is the value one we serve?, what we accept). Every entry changes what the adapter
# computes (or needs weights we do not load), so a value outside the accepted set is refused, never ignored.
_SERVED_ONLY: dict[str, tuple[object, Callable[[object], bool], str]] = {
    "task_type": (None, lambda v: v in (None, "CAUSAL_LM"), '"CAUSAL_LM" or null'),
    "bias": ("none", lambda v: v == "none", '"none"'),
    "use_dora": (False, lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (False, _off, "false"),
    "lora_bias": (False, _off, "false"),
    "use_qalora": (False, _off, "false"),
    "modules_to_save": (None, _off, "null or [] (fully trained extra modules are not served)"),
    "target_parameters": (None, _off, "null or []"),
    "trainable_token_indices": (None, _off, "null or empty"),
    "layer_replication": (None, _off, "null or []"),
    "alora_invocation_tokens": (None, _is_null, "null (activated LoRA is not served)"),
    # LoRA variants with their own layer code (peft marks these is_lora_variant); even {} turns one on.
    "velora_config": (None, _is_null, "null"),
    "monteclora_config": (None, _is_null, "null"),
    "arrow_config": (None, _is_null, "null"),
    "kasa_config": (None, _is_null, "null"),
    "use_bdlora": (None, _is_null, "null"),
    "init_lora_weights": (
        True,
        lambda v: not (isinstance(v, str) and v.lower().startswith(_BASE_REWRITING_INITS)),
        "true, false, or an init that leaves the base weights untouched (gaussian, eva, orthogonal, mica)",
    ),
}


@dataclass(frozen=True)
class LoraSpec:
    """How one LoRA adapter applies to a base model; module names are full paths inside the base model.

    target_modules: tuple of names/suffixes (sorted, peft treats them as a set), a regex string, or ``ALL_LINEAR``
    rank_pattern / alpha_pattern: regex key -> r / alpha (treat as read-only); the first key in file order that
        matches wins, and peft saves with sort_keys=True, so that is alphabetical order, as peft itself loads it
    layers_to_transform / layers_pattern: layer-index filter for list targets; None means no filter

    Construction compiles every regex (``module_patterns``) and raises AdapterFormatError or
    UnsupportedAdapterError, naming the field, for one that is too long or cannot be matched in linear time.
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    rank_pattern: dict[str, int] = field(hash=False)
    alpha_pattern: dict[str, float] = field(hash=False)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False  # DoRA: a learned magnitude per output feature over the normalised W + scale * B A
    peft_type: str = "LORA"  # "LORA", or "ADALORA" (converted to the LoRA layout when read)
    _matchers: mp.ModuleMatchers = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        tm = self.target_modules
        matchers = mp.ModuleMatchers.compile(
            target_regex=tm if isinstance(tm, str) and tm != ALL_LINEAR else None,
            target_names=() if isinstance(tm, str) else tm,
            exclude=self.exclude_modules,
            layers_pattern=self.layers_pattern,
            layers_to_transform=self.layers_to_transform,
            rank_keys=self.rank_pattern,
            alpha_keys=self.alpha_pattern,
        )
        object.__setattr__(self, "_matchers", matchers)

    def targets(self, module_names: Iterable[str], linear_names: Iterable[str] | None = None) -> list[str]:
        """The names among ``module_names`` this adapter adapts, in their order, with peft's semantics.

        A list entry matches a name equal to it (no layer filter: peft returns early) or ending with '.'+entry (then
        filtered by layer index); a string is re.fullmatch'ed; exclude_modules wins over both. ``ALL_LINEAR`` means
        every name in ``linear_names``: the base's nn.Linear (and transformers Conv1D) modules, output head removed,
        which is how peft expands it (and then saves the expanded list, so a trained adapter rarely says all-linear).
        """
        if self.target_modules == ALL_LINEAR:
            if linear_names is None:
                raise ValueError("target_modules='all-linear' needs linear_names (the base's linear modules)")
            linear = set(linear_names)
            return [n for n in module_names if n in linear and not self._excluded(n)]
        # peft never matches the root module (empty name), even for a regex such as ".*"
        return [n for n in module_names if n and not self._excluded(n) and self._targeted(n)]

    def rank_for(self, module_name: str) -> int:
        """r for ``module_name``: the first rank_pattern key matching the end of the name, else ``r``."""
        return self._rank_and_alpha(module_name)[0]

    def alpha_for(self, module_name: str) -> float:
        """lora_alpha for ``module_name``: the first alpha_pattern key matching the end of the name, else lora_alpha."""
        return self._rank_and_alpha(module_name)[1]

    def scale_for(self, module_name: str) -> float:
        """The factor on B @ A for ``module_name``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self._rank_and_alpha(module_name)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def max_rank(self) -> int:
        """The largest rank of any module: what a slot must hold."""
        return max([self.r, *self.rank_pattern.values()])

    def _rank_and_alpha(self, name: str) -> tuple[int, float]:
        # Remembered per name: each key costs one match, and the reader asks for the rank and scale of every target.
        found = self._matchers.found.get(name)
        if found is None:
            # peft's get_pattern_key falls back to the name itself as the key when no pattern matches
            rank_key = self._matchers.first_rank_key(name) or name
            alpha_key = self._matchers.first_alpha_key(name) or name
            found = (self.rank_pattern.get(rank_key, self.r), self.alpha_pattern.get(alpha_key, self.lora_alpha))
            self._matchers.found[name] = found
        return found

    def _excluded(self, name: str) -> bool:
        return self._matchers.excluded(name)

    def _targeted(self, name: str) -> bool:
        return self._matchers.targeted(name)


def parse_lora_config(raw: bytes | str | dict[str, object]) -> LoraSpec:
    """Parse and validate an ``adapter_config.json``; missing keys take peft's defaults (r=8, lora_alpha=8).

    Raises AdapterFormatError (not a valid LoRA config) or UnsupportedAdapterError (a peft feature we do not
    serve); the message names the field, its value and what is accepted.
    """
    cfg = _load_object(raw)
    peft_type = cfg.get("peft_type")
    if peft_type == "ADALORA":  # converted to the LoRA layout; imported here as adalora builds on this module
        from server.adapters.adalora import parse_adalora_config

        return parse_adalora_config(cfg)
    if peft_type != "LORA":
        raise AdapterFormatError(
            f"peft_type={_show(peft_type)} is not served; served kinds: LoRA (peft_type \"LORA\", DoRA with "
            'use_dora) and AdaLoRA ("ADALORA")'
        )
    for name, (default, served, accepted) in _SERVED_ONLY.items():
        value = cfg.get(name, default)
        if not served(value):
            raise UnsupportedAdapterError(f"{name}={_show(value)} is not supported; accepted: {accepted}")
    if cfg.get("use_dora") is True and not _off(cfg.get("megatron_config")):  # PEFT's LoraConfig refuses it too
        raise UnsupportedAdapterError("use_dora=true with a megatron_config is not supported (nor by PEFT)")

    r = cfg.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise AdapterFormatError(f"r={_show(r)}: the rank must be a positive integer")
    alpha = cfg.get("lora_alpha", 8)
    if not _is_finite(alpha):
        raise AdapterFormatError(f"lora_alpha={_show(alpha)}: must be a finite number")
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterFormatError(f"use_rslora={_show(use_rslora)}: must be true or false")
    rank_pattern = _patterns(cfg, "rank_pattern", lambda v: _is_int(v) and v > 0, "positive integer ranks")
    alpha_pattern = _patterns(cfg, "alpha_pattern", _is_finite, "finite numbers")

    target_modules = _names(cfg, "target_modules")
    if target_modules is None:
        raise AdapterFormatError("target_modules is missing or empty: the config must say which modules it adapts")
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        target_modules = ALL_LINEAR
    exclude = _names(cfg, "exclude_modules")
    layers = _layers_to_transform(cfg.get("layers_to_transform"))
    layers_pattern = _names(cfg, "layers_pattern", ordered=True)
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    # The same combinations LoraConfig.__post_init__ rejects, so we never guess a meaning peft does not have.
    for key, value in (("layers_to_transform", layers), ("layers_pattern", layers_pattern)):
        if value is not None and isinstance(target_modules, str):
            raise AdapterFormatError(
                f"{key}={_show(cfg[key])} cannot be used with a string target_modules {_show(target_modules)}"
            )
    if layers_pattern is not None and layers is None:
        shown = _show(cfg["layers_pattern"])
        raise AdapterFormatError(f"layers_pattern={shown} needs layers_to_transform to be set too")

    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterFormatError(f"base_model_name_or_path={_show(base)}: must be a string or null")
    alpha_pattern = {k: float(v) for k, v in alpha_pattern.items()}
    return LoraSpec(
        r,
        float(alpha),
        use_rslora,
        target_modules,
        rank_pattern,
        alpha_pattern,
        layers,
        layers_pattern,
        exclude,
        base,
        use_dora=cfg.get("use_dora") is True,
    )


def _load_object(raw: bytes | str | dict[str, object]) -> dict[str, object]:
    cfg = raw if isinstance(raw, dict) else load_config_json(raw)
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> TypeGuard[int | float]:
    # JSON allows NaN/Infinity as Python writes them; a non-finite alpha would poison every output. An int too large
    # for a float (only from a dict: the JSON reader bounds literals) is not finite as a scale either.
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value: object) -> str:
    """``repr(value)`` cut to 120 characters: a refusal never echoes a megabyte back (nor fails on a huge int)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4,300-digit str limit (only from a dict: JSON literals are bounded)
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= 120 else text[:120] + "..."


def _patterns(cfg: dict[str, object], key: str, valid: Callable[[object], bool], accepted: str) -> dict:
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"{key}={_show(patterns)}: must be an object mapping module regexes to values")
    for pattern, value in patterns.items():  # the keys are compiled (and refused) with the LoraSpec
        if not valid(value):
            raise AdapterFormatError(f"{key}[{_show(pattern)}]={_show(value)}: values must be {accepted}")
    return dict(patterns)


def _names(cfg: dict[str, object], key: str, *, ordered: bool = False) -> tuple[str, ...] | str | None:
    """A regex string or a name list, sorted and deduplicated as peft keeps it as a set (``ordered``: file order,
    for layers_pattern, whose first matching entry wins); empty or null -> None, as peft treats empty."""
    value = cfg.get(key)
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):  # a regex, compiled (and refused) with the LoraSpec
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterFormatError(f"{key}={_show(value)}: must be a regex string or a list of non-empty module names")
    if ordered:  # layer patterns are regex fragments, compiled with the LoraSpec
        return tuple(value)
    return tuple(sorted(set(value)))


def _layers_to_transform(value: object) -> tuple[int, ...] | None:
    if value is None or value == []:  # peft: an empty list means no layer filter
        return None
    layers = [value] if _is_int(value) else value
    if not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers):
        shown = _show(value)
        raise AdapterFormatError(f"layers_to_transform={shown}: must be a layer index or a list of layer indices")
    return tuple(layers)
