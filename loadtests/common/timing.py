"""How the benchmarks time contenders: side by side in one process, interleaved round by round, so the drift of a
shared machine (tens of percent over minutes) hits them all alike. Callers take the median or the best round."""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Rounds(Generic[T]):
    """Per contender: the wall seconds of each kept round and what its call returned in that round."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, list[T]] = field(default_factory=dict)

    def last(self, name: str) -> T:
        return self.results[name][-1]


def interleave(contenders: Mapping[str, Callable[[], T]], rounds: int, *, warmup: int = 0, alternate: bool = False,
               sync: Callable[[], None] | None = None) -> Rounds[T]:  # fmt: skip
    """Call every contender once per round, in turn; the first ``warmup`` rounds are not kept. ``alternate``
    reverses the order in every other round (A B, B A, ...: ABBA for two contenders). ``sync`` runs before and after
    each timed call (e.g. ``torch.cuda.synchronize``), so queued device work is counted where it belongs."""
    out: Rounds[T] = Rounds({name: [] for name in contenders}, {name: [] for name in contenders})
    names = list(contenders)
    for r in range(warmup + rounds):
        for name in reversed(names) if alternate and (r - warmup) % 2 else names:
            if sync is not None:
                sync()
            start = time.perf_counter()
            result = contenders[name]()
            if sync is not None:
                sync()
            if r >= warmup:
                out.seconds[name].append(time.perf_counter() - start)
                out.results[name].append(result)
    return out


class Laps:
    """Seconds of consecutive phases of a run: ``lap(name)`` ends the phase that began at the previous lap (or at
    creation) and records it under ``name``."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name], self._last = now - self._last, now
        return self.phases[name]
