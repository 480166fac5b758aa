"""A weighted mixture's key, ``mix:<name>*<weight>+<name>*<weight>...``, and the checks on its parts: torch-free, so
the Ray ingress routes by a mixture's key without importing the weights code (``mixture.py`` re-exports all of it).
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

MIXTURE_PREFIX = "mix:"
MAX_MIXTURE_PARTS = 8  # a mixture's rank is the sum of its parts' ranks: it must fit the adapter pool
MAX_MIXTURE_WEIGHT = 100.0  # |weight| bound: past it A * weight overflows half precision for ordinary adapters
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # registry.NAME_PATTERN without its anchors
_WEIGHT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"  # a decimal literal: no "inf", "nan" or "1_0"
_ITEM = rf"({_NAME})\*({_WEIGHT})"
_KEY = re.compile(rf"{re.escape(MIXTURE_PREFIX)}{_ITEM}(?:\+{_ITEM})*")


class MixtureError(ValueError):
    """A mixture written wrongly or out of bounds; the message says what to change (a client error)."""


@dataclass(frozen=True)
class MixturePart:
    name: str
    weight: float


def is_mixture_key(adapter: str | None) -> bool:
    return adapter is not None and adapter.startswith(MIXTURE_PREFIX)


def mixture_key(parts: Sequence[MixturePart]) -> str:
    """The cache key of a mixture: ``mix:a*0.7+b*0.3`` (weights as Python writes floats, so the key round-trips)."""
    return MIXTURE_PREFIX + "+".join(f"{p.name}*{float(p.weight)!r}" for p in parts)


def part_names(key: str) -> list[str]:
    """The registered adapters ``key`` names: a mixture's parts, or the name itself (MixtureError as
    ``parse_mixture_key``)."""
    parts = parse_mixture_key(key)
    return [key] if parts is None else [p.name for p in parts]


def parse_mixture_key(key: str) -> tuple[MixturePart, ...] | None:
    """The parts of ``mix:name*weight+name*weight...``; None for a plain adapter name (no ``mix:`` prefix).

    Raises MixtureError for a key with the prefix that is not that syntax (names as uploads name adapters, weights
    decimal numbers such as ``0.7``, ``-1`` or ``2.5e-1``)."""
    if not key.startswith(MIXTURE_PREFIX):
        return None
    if _KEY.fullmatch(key) is None:
        shown = key if len(key) <= 120 else key[:120] + "..."
        raise MixtureError(
            f"{shown!r} is not a mixture: write mix:<adapter>*<weight>+<adapter>*<weight>..., "
            "e.g. mix:legal*0.7+tone*0.3"
        )
    body = key[len(MIXTURE_PREFIX) :]
    return tuple(MixturePart(m.group(1), float(m.group(2))) for m in re.finditer(_ITEM, body))


def canonical_key(parts: Sequence[MixturePart]) -> str:
    """The engine's key of a mixture written any way (object or key): its parts checked (MixtureError), then keyed."""
    check_parts(parts)
    return mixture_key(parts)


def check_parts(parts: Sequence[MixturePart]) -> None:
    """Refuse (MixtureError) what a client may not ask for: no parts or more than MAX_MIXTURE_PARTS, a name twice,
    a weight that is not finite or beyond +-MAX_MIXTURE_WEIGHT."""
    if not 1 <= len(parts) <= MAX_MIXTURE_PARTS:
        raise MixtureError(f"a mixture has 1 to {MAX_MIXTURE_PARTS} adapters, not {len(parts)}")
    names = [p.name for p in parts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MixtureError(f"adapter {twice[0]!r} appears more than once in the mixture; give it one weight")
    for p in parts:
        if not math.isfinite(p.weight) or abs(p.weight) > MAX_MIXTURE_WEIGHT:
            bound = f"{MAX_MIXTURE_WEIGHT:g}"
            raise MixtureError(f"weight {p.weight} of {p.name!r} must be a finite number in [-{bound}, {bound}]")
