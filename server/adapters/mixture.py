"""Weighted mixtures of LoRA adapters, computed as PEFT's ``add_weighted_adapter(..., combination_type="cat")``.

A mixture stays unmerged: its A is the parts' A matrices stacked (each times its weight and its own scale), its B
the parts' B matrices side by side, so its rank is the sum of the parts' ranks and it runs on the same kernels as
any adapter. PEFT gives the new adapter ``r = lora_alpha = sum of the parts' largest ranks`` and copies
``use_rslora`` from the first part, so its scale is 1, or ``sqrt(r)`` when the first part uses rsLoRA; so here.
(For a single part PEFT switches to its "linear" combination, which gives the same delta ``weight * scale * B A``.)

A mixture is cached like an adapter under a key no uploaded name can take (names never hold ':', '*' or '+'):
``mix:<name>*<weight>+<name>*<weight>...``, built by ``mixture_key`` and read back by ``parse_mixture_key``; it is
also the ``model`` syntax of the OpenAI endpoints. ``MixtureCopies`` tracks which mixture keys may have a cached copy,
so deleting a part drops them all.
"""

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from server.adapters.archive import CONFIG_FILE
from server.adapters.checkpoint import AdapterWeights, LayerWeights, TargetableModules
from server.adapters.errors import AdapterError, AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from server.adapters.mixture_keys import (  # noqa: F401  (re-exported: the mixture API is this module's)
    MAX_MIXTURE_PARTS,
    MAX_MIXTURE_WEIGHT,
    MIXTURE_PREFIX,
    MixtureError,
    MixturePart,
    canonical_key,
    check_parts,
    is_mixture_key,
    mixture_key,
    parse_mixture_key,
)
from server.adapters.peft_config import LoraSpec, parse_lora_config


def check_mixable(specs: Sequence[tuple[str, LoraSpec]], modules: TargetableModules) -> int:
    """Check from the parts' configs alone that ``cat_adapters`` accepts them on this model; returns the pool rows the
    mixture takes (the largest, over the modules, of the sum of the parts' ranks there).

    specs: (name, parsed adapter_config.json) per part, in order. Raises UnsupportedAdapterError (a DoRA or AdaLoRA
    part) or AdapterMismatchError (the parts adapt different modules or name different base models).
    """
    first_name, first = specs[0]
    for name, spec in specs:
        _check_plain(name, spec)
    targets = [frozenset(spec.targets(modules.module_names, modules.linear_names)) for _, spec in specs]
    for (name, _), found in zip(specs[1:], targets[1:], strict=True):
        if found != targets[0]:
            only = sorted(found ^ targets[0])
            raise AdapterMismatchError(
                f"adapters in a mixture must adapt the same modules: {name!r} and {first_name!r} differ on "
                f"{', '.join(only[:3])}{' ...' if len(only) > 3 else ''}"
            )
    _check_bases(specs)
    return max((sum(spec.rank_for(m) for _, spec in specs) for m in targets[0]), default=0)


class MixtureChecks:
    """``check_mixable`` from the parts' ``adapter_config.json`` files, remembered per list of part names while those
    files are unchanged (a new upload under a name is a new file), so a hot mixture is checked in microseconds
    instead of matching every part's targets against the model's modules again (milliseconds). Thread-safe."""

    def __init__(self, modules: TargetableModules, capacity: int = 256) -> None:
        self._modules = modules
        self._capacity = capacity
        # part names -> (the configs' identities, rows or the refusal's (class, message))
        self._verdicts: OrderedDict[tuple[str, ...], tuple[tuple[object, ...], int | tuple[type, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, folders: Sequence[tuple[str, Path]]) -> int:
        """The pool rows of the mixture of ``folders`` ((name, adapter folder) per part, in order); raises as
        ``check_mixable`` does, or OSError when a config cannot be read (a part being deleted)."""
        names = tuple(name for name, _ in folders)
        identity = tuple(_identity(folder / CONFIG_FILE) for _, folder in folders)
        with self._lock:
            cached = self._verdicts.get(names)
            if cached is not None and cached[0] == identity:
                self._verdicts.move_to_end(names)
        if cached is None or cached[0] != identity:
            specs = [(name, parse_lora_config((folder / CONFIG_FILE).read_bytes())) for name, folder in folders]
            try:
                verdict: int | tuple[type, str] = check_mixable(specs, self._modules)
            except AdapterError as exc:
                verdict = (type(exc), str(exc))
            with self._lock:
                self._verdicts[names] = (identity, verdict)
                while len(self._verdicts) > self._capacity:
                    self._verdicts.popitem(last=False)
        else:
            verdict = cached[1]
        if isinstance(verdict, tuple):
            raise verdict[0](verdict[1])
        return verdict


def _identity(path: Path) -> tuple[object, ...]:
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


def cat_adapters(parts: Sequence[tuple[AdapterWeights, float]]) -> AdapterWeights:
    """One adapter equal to ``scale * sum_i weight_i * scale_i * B_i A_i`` in every module, as PEFT's "cat" builds it.

    parts: (host weights, weight) pairs, in order; weights may be negative (subtraction). Per module:
        A = cat_i(A_i * weight_i * scale_i)  [sum r_i, in]    B = cat_i(B_i, dim=1)  [out, sum r_i]
        scale = 1, or sqrt(sum of the parts' largest ranks) when the first part uses rsLoRA (PEFT's new config)
    computed in float32 and stored in the parts' dtype. Raises UnsupportedAdapterError for DoRA or AdaLoRA parts
    (PEFT's "cat" is defined for plain LoRA), AdapterMismatchError when the parts adapt different modules or were
    trained on different bases, AdapterFormatError when the weights overflow the dtype.
    """
    if not parts:
        raise ValueError("a mixture needs at least one adapter")
    specs = [(f"part {i}", w.spec) for i, (w, _) in enumerate(parts)]
    for name, spec in specs:
        _check_plain(name, spec)
    modules = set(parts[0][0].layers)
    for w, _ in parts[1:]:
        if set(w.layers) != modules:
            raise AdapterMismatchError("adapters in a mixture must adapt the same modules")
    _check_bases(specs)
    rank = sum(spec.max_rank for _, spec in specs)  # PEFT sums each part's config rank (r or its largest pattern)
    first = specs[0][1]
    scale = math.sqrt(rank) if first.use_rslora else 1.0  # PEFT: lora_alpha = r = rank, use_rslora from part 0
    layers: dict[str, LayerWeights] = {}
    for name in parts[0][0].layers:
        pieces = [(w.layers[name], weight) for w, weight in parts]
        dtype = pieces[0][0].a.dtype
        a = torch.cat([lw.a.float() * (weight * lw.scale) for lw, weight in pieces]).to(dtype)
        b = torch.cat([lw.b.float() for lw, _ in pieces], dim=1).to(dtype)
        if not bool(torch.isfinite(a).all()):
            raise AdapterFormatError(f"{name}: the mixture's weights overflow {dtype} (weight * scale too large)")
        layers[name] = LayerWeights(a.contiguous(), b.contiguous(), scale)
    spec = LoraSpec(
        r=rank,
        lora_alpha=float(rank),
        use_rslora=first.use_rslora,
        target_modules=tuple(sorted(modules)),
        rank_pattern={},
        alpha_pattern={},
        base_model_name_or_path=first.base_model_name_or_path,
    )
    return AdapterWeights(spec, layers)


def _check_plain(name: str, spec: LoraSpec) -> None:
    if spec.use_dora or spec.peft_type != "LORA":
        kind = "a DoRA" if spec.use_dora else f"an {spec.peft_type}"
        raise UnsupportedAdapterError(
            f"{name!r} is {kind} adapter and cannot be mixed: PEFT's cat combination is defined for plain LoRA"
        )


def _check_bases(specs: Sequence[tuple[str, LoraSpec]]) -> None:
    bases = {s.base_model_name_or_path for _, s in specs if s.base_model_name_or_path}
    if len(bases) > 1:
        raise AdapterMismatchError(f"adapters in a mixture must share a base model; they name {sorted(bases)}")


class MixtureCopies:
    """The mixture keys that may have a cached copy (a prefetched read, a host copy, a slot), so that deleting a part
    drops every mixture made from it. Thread-safe.

    Every cached copy comes from a read, and every read registers its key first (``reading``), so no copy escapes.
    Keys with no copy left (``is_cached`` false) and no read since the check are pruned at each read, which bounds
    the set by the caches' sizes however many distinct mixtures clients ask for. ``is_cached`` is called without
    this object's lock held (it takes the caches' locks, and a read may run under the slot cache's lock).
    """

    def __init__(self, is_cached: Callable[[str], bool]) -> None:
        self._is_cached = is_cached
        self._keys: dict[str, tuple[frozenset[str], int]] = {}  # key -> (its part names, reads begun so far)
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def reading(self, key: str, parts: Sequence[MixturePart]) -> Iterator[None]:
        """Register ``key`` for the duration of a read of it (and after, until pruned)."""
        self._prune(key)
        with self._lock:
            reads = self._keys.get(key, (frozenset(), 0))[1]
            self._keys[key] = (frozenset(p.name for p in parts), reads + 1)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[key] -= 1
                if not self._in_flight[key]:
                    del self._in_flight[key]

    def containing(self, part: str) -> list[str]:
        """The tracked mixture keys that have ``part`` among their parts."""
        with self._lock:
            return [key for key, (names, _) in self._keys.items() if part in names]

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def _prune(self, reading: str) -> None:
        with self._lock:
            seen = {k: reads for k, (_, reads) in self._keys.items() if k != reading and k not in self._in_flight}
        idle = [k for k in seen if not self._is_cached(k)]
        with self._lock:
            for key in idle:  # unless a read of it began meanwhile
                if key not in self._in_flight and key in self._keys and self._keys[key][1] == seen[key]:
                    del self._keys[key]
