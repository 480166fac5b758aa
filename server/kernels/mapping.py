"""Per-step token -> slot mapping: which adapter slot each token of the flattened batch uses.

Built once per forward pass on the host from plain ints. It is op-neutral and holds no tensors: the active op's
``prepare`` turns it into that op's own metadata (``server.kernels.protocol``), once per step, and the wrapped
layers read that through ``server.lora.context``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.kernels.slots import BASE_SLOT

Run = tuple[int, int, int]  # (slot, start, end): tokens start..end-1 of the step all use ``slot``


@dataclass(frozen=True)
class TokenSlotMapping:
    """Token -> slot assignment for one forward pass over ``T`` flattened tokens (batch-major, then position).

    slots:  [T] host ints, the slot of each token (BASE_SLOT = no adapter)
    runs:   host (slot, start, end) runs of consecutive tokens on one adapter slot, in token order, base tokens
            excluded; empty when no token uses an adapter (the layers then skip the LoRA add)
    device: where the ops put their per-step tensors
    """

    slots: tuple[int, ...]
    runs: tuple[Run, ...]
    device: torch.device

    @property
    def num_tokens(self) -> int:
        return len(self.slots)

    @property
    def gathered(self) -> bool:
        """Whether some adapter slot's tokens are split over several runs (so a per-slot segment must gather)."""
        return len(self.runs) != len({slot for slot, _, _ in self.runs})

    @classmethod
    def build(cls, slots: Sequence[int], device: torch.device | str = "cpu") -> "TokenSlotMapping":
        """Mapping for tokens whose slots are ``slots`` (host ints, one per flattened token)."""
        runs: list[Run] = []
        for t, slot in enumerate(slots):
            if runs and runs[-1][0] == slot and runs[-1][2] == t:
                runs[-1] = (slot, runs[-1][1], t + 1)
            else:
                runs.append((slot, t, t + 1))
        adapter_runs = tuple(run for run in runs if run[0] != BASE_SLOT)
        return cls(tuple(slots), adapter_runs, torch.device(device))

    def token_slots(self) -> torch.Tensor:
        """[T] int64 on ``device``: the slot of each token."""
        return torch.tensor(self.slots, dtype=torch.int64, device=self.device)
