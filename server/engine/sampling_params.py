"""How one request picks its tokens, validated once at construction (torch-free: the scheduler and the API use it).

The torch sampler that applies these parameters is ``server.engine.sampling``.
"""

import math
from dataclasses import dataclass

from server.engine.logprob import MAX_TOP_LOGPROBS

# OpenAI's limits on stop strings: at most 4. Their length is ours: stop strings in use are role markers and
# delimiters ("<|im_end|>", "\nUser:"), far below 256 characters; the cap bounds what a stream may hold back and the
# per-request matcher tables built on the submitting thread.
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters
_SEED_LIMIT = 2**63
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for one bias: [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 1024  # a bound on the per-step work of one row (OpenAI documents no limit; 300 is typical)
MAX_STOP_TOKEN_IDS = 64
# A repetition penalty far from 1 overflows: logit / 5e-324 is infinite. vLLM bounds it only below (> 0); the
# practical range is 1.0-2.0, so [0.01, 100] refuses nothing anyone uses and keeps every logit finite.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature == 0`` means greedy (top-k/top-p/seed are then unused).

    Penalties follow vLLM's definitions: ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, in [-2, 2]) act on
    the tokens generated so far (logit -= frequency * count + presence * (count > 0)); ``repetition_penalty`` (> 0,
    1 = off; the CTRL paper's, as Hugging Face applies it) on every token of the prompt and the output (positive
    logits divided by it, negative ones multiplied). ``logit_bias`` adds to the logits of the given token ids.
    ``min_tokens``: end-of-sequence tokens (unless ``ignore_eos``) and ``stop_token_ids`` cannot be sampled, and
    stop strings do not end the request, before that many tokens. All of these apply before temperature, top-k and
    top-p.
    """

    max_new_tokens: int = 128  # 0: only score the prompt (with ``prompt_logprobs``), generate nothing
    temperature: float = 0.0
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = a fresh random seed per request
    stop: tuple[str, ...] = ()  # at most MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_LENGTH characters
    ignore_eos: bool = False
    # Log-probabilities: None = not asked; k >= 0 = the chosen token's and the k most probable alternatives'.
    logprobs: int | None = None  # for each generated token (of the distribution it was sampled from)
    prompt_logprobs: int | None = None  # for each prompt token after the first (of the model's raw distribution)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), each id at most once
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # a generated one ends the request (reason STOP; its text is not output)
    skip_special_tokens: bool = True  # leave special tokens out of the output text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # tuple("abc") would silently become three one-character stops
            raise ValueError("stop must be a sequence of strings, not one string")
        # A list is a natural thing to pass; store a tuple so the params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_new_tokens 0 only scores the prompt: it needs prompt_logprobs")
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
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:  # also rejects NaN
            raise ValueError(f"repetition_penalty must be in [{low}, {high}], got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias accepts at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(self.logit_bias)}")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError("logit_bias names a token id more than once")
        for token, bias in self.logit_bias:
            if token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias: token ids must be >= 0 and biases in [-100, 100], got {token}: {bias}")
        if self.min_tokens < 0 or self.min_tokens > max(self.max_new_tokens, 0):
            raise ValueError(f"min_tokens must be in [0, max_new_tokens], got {self.min_tokens}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids, each >= 0")

    @property
    def penalised(self) -> bool:
        """Whether anything changes the logits before temperature (penalties, bias, min_tokens)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
            or self.min_tokens
        )

    def token_ids(self) -> list[int]:
        """Every token id these parameters name (checked against the vocabulary by the engine)."""
        return [t for t, _ in self.logit_bias] + list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # a tinier one overflows logits / temperature in float32: NaN draws
