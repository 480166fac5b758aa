"""When to fold a dominant adapter into the base weights, and when to unfold it (torch-free).

As dLoRA (OSDI 2024) switches between merged and unmerged inference: when one adapter holds most of the running
batch, its rows run fastest on merged weights ``W + s B A`` (no LoRA work for them at all), and the few other rows
pay a low-rank correction. Merging costs a rewrite of the adapted base weights (about a second of one core for
SmolLM2-135M on a CPU, off the engine thread; in place on CUDA), so the decision has hysteresis: an adapter is merged
after holding at least ``merge_share`` of the rows for ``patience`` consecutive steps, and unmerged after
``patience`` consecutive steps below ``unmerge_share`` (a step where it has no rows counts as share 0). The rows are
whatever the caller counts: the engine counts the step's rows and the requests waiting to be admitted (the rows of
the next steps). Idle steps (no rows) count for nothing.

Virtual adapters (keys with a ':': mixtures, corrections) are never merged, and adapters found unfit (DoRA: its
rescaling depends on the base weight, so no low-rank correction is exact) are ``refuse``d for good: they are never
merged, and while one of them runs nothing is merged.
"""

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MergePolicyConfig:
    merge_share: float = 0.75  # a step counts towards merging an adapter that holds at least this share of its rows
    unmerge_share: float = 0.5  # a step counts towards unmerging when the merged adapter holds less than this
    patience: int = 64  # consecutive steps of either kind before acting (a merge costs about as much as many steps)

    def __post_init__(self) -> None:
        if not 0.0 < self.unmerge_share <= self.merge_share <= 1.0:
            raise ValueError(
                f"need 0 < unmerge_share <= merge_share <= 1, got {self.unmerge_share} and {self.merge_share}"
            )
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")


class MergePolicy:
    """Decides, one step at a time from the step's rows per adapter, which adapter should be merged (or none)."""

    def __init__(self, config: MergePolicyConfig | None = None) -> None:
        self.config = config if config is not None else MergePolicyConfig()
        self._candidate: str | None = None  # the adapter the streak is about (the merged one while merged)
        self._streak = 0  # consecutive steps counting towards the next change
        self._refused: set[str] = set()

    def refuse(self, name: str) -> None:
        """``name`` can be neither merged nor corrected (e.g. DoRA): never merge it or while it runs."""
        self._refused.add(name)

    def forget(self, name: str) -> None:
        """``name`` was deleted: a new upload under its name is judged afresh."""
        self._refused.discard(name)

    def refused(self, name: str) -> bool:
        return name in self._refused

    def reset(self) -> None:
        """Start counting afresh (after an unmerge forced by something other than this policy)."""
        self._candidate, self._streak = None, 0

    def observe(self, rows: Mapping[str | None, int], merged: str | None) -> str | None:
        """The adapter that should be merged for this step: ``merged`` to keep it, None to unmerge (or stay
        unmerged), another name to merge that one (after unmerging ``merged``, if any).

        rows: adapter name (None: the base model) -> rows it has in this step; merged: the adapter merged now.
        """
        total = sum(rows.values())
        if total == 0:
            return merged
        if any(name is not None and name in self._refused for name in rows):
            self.reset()  # such rows cannot run on merged weights: unmerge at once, and count afresh after
            return None
        config = self.config
        if merged is not None:
            if self._candidate != merged:
                self._candidate, self._streak = merged, 0
            low = rows.get(merged, 0) / total < config.unmerge_share
            self._streak = self._streak + 1 if low else 0
            if self._streak >= config.patience:
                self.reset()
                return None
            return merged
        top = max((name for name in rows if name is not None and _mergeable(name)), key=lambda n: (rows[n], n),
                  default=None)  # fmt: skip
        if top is None or rows[top] / total < config.merge_share:
            self.reset()
            return None
        if top != self._candidate:
            self._candidate, self._streak = top, 0
        self._streak += 1
        # The streak is kept once reached: a merge that has to wait (reads in flight) is asked for again next step.
        return top if self._streak >= config.patience else None


def _mergeable(name: str) -> bool:
    """Uploaded adapters only: a key with ':' is a virtual adapter (a mixture, a correction)."""
    return ":" not in name
