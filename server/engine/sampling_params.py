"""How one request picks its tokens, validated once at construction (torch-free: the scheduler and the API use it).

The torch sampler that applies these parameters is ``server.engine.sampling``.
"""

import math
from dataclasses import dataclass

# OpenAI's limits on stop strings: at most 4. Their length is ours: stop strings in use are role markers and
# delimiters ("<|im_end|>", "\nUser:"), far below 256 characters; the cap bounds what a stream may hold back and the
# per-request matcher tables built on the submitting thread.
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters
_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature == 0`` means greedy (top-k/top-p/seed are then unused)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = a fresh random seed per request
    stop: tuple[str, ...] = ()  # at most MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_LENGTH characters
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # tuple("abc") would silently become three one-character stops
            raise ValueError("stop must be a sequence of strings, not one string")
        # A list is a natural thing to pass; store a tuple so the params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_LENGTH:
            raise ValueError(f"stop strings may have at most {MAX_STOP_LENGTH} characters, got one of {longest}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # a tinier one overflows logits / temperature in float32: NaN draws
