"""Log-probabilities as the engine reports them (torch-free: the API layer turns them into OpenAI's shapes)."""

from dataclasses import dataclass

# How many alternatives a request may ask for at each position (OpenAI's completions limit is 5, chat's 20; vLLM
# allows 20 for both).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token and its log-probability, with the ``top`` most probable alternatives.

    ``logprob`` may be ``-inf`` (a token outside the top-k/top-p set cannot be sampled but can be scored in a prompt);
    the API layer decides how to write that in JSON. ``top`` holds (token id, log-probability) pairs, most probable
    first, ties broken by the lower token id; its length is what the request asked for (fewer only when the
    vocabulary is smaller).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
