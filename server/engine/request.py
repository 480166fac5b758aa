"""A generation request as the engine tracks it (torch-free)."""

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field

from server.engine.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string appeared
    EOS = "eos"  # the model produced an end-of-sequence token
    CANCELLED = "cancelled"  # the client went away or cancelled
    ERROR = "error"  # the request could not be served (e.g. its adapter failed to load)
    TIMEOUT = "timeout"  # the request did not finish before its deadline
    ADAPTER_DELETED = "adapter_deleted"  # its adapter was deleted before the request could start


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class EngineRequest:
    """One request's state. ``num_computed`` tokens of ``prompt_ids + output_ids`` have their K/V in the cache, in
    the KV blocks of ``block_table`` (position p is at offset p % block_size of block ``block_table[p // block_size]``).
    """

    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)  # KV blocks while running (empty while waiting)
    slot: int | None = None  # LoRA slot while running (BASE_SLOT for the base model)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    cancelled: bool = False
    deadline: float | None = None  # monotonic time past which the request is finished with TIMEOUT
    admitted_at: float | None = None  # its first admission (a preempted request keeps it)
    first_token_at: float | None = None
    finished_at: float | None = None
    # Another sequence on the same prompt (``n`` > 1): while it runs with its prompt's K/V in the cache, this one
    # starts from its prompt's KV blocks (shared, the partial last one copied) instead of prefilling it again.
    fork_parent: "EngineRequest | None" = None
    # Prefix-cache namespace (set by the engine at submit): requests with equal keys share cached KV blocks of equal
    # token prefixes, so the key must name everything besides the tokens that K/V depends on (the adapter, when it
    # touches k/v projections). None: this request neither reuses nor leaves cached blocks.
    cache_key: Hashable | None = None
    num_cached_tokens: int = 0  # positions its last admission found in the prefix cache (not computed again)
    num_preemptions: int = 0  # times its blocks were taken back while it ran (it then recomputed from the start)
    prompt_scored: int = 0  # engine-owned: prompt positions whose log-probs were reported (kept over preemption)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_tokens(self) -> int:
        """Positions this request can ever need: prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def fork_length(self) -> int | None:
        """Positions of the prompt this request can share with its fork parent's KV blocks now, or None if it cannot.

        All but the last prompt token: the last one is run again so that this request gets logits of its own."""
        parent = self.fork_parent
        if parent is None or parent.status is not Status.RUNNING:
            return None
        length = len(self.prompt_ids) - 1
        return length if parent.num_computed >= length else None

    def fork_start(self) -> int | None:
        """Prompt positions this request starts from its fork parent's blocks at admission (0: it computes them all),
        or None while the parent has not computed them. A finished parent (its blocks are gone) is forgotten."""
        parent = self.fork_parent
        if parent is None:
            return 0
        if parent.status is Status.FINISHED:
            self.fork_parent = None
            return 0
        return self.fork_length

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start..end`` of prompt + output, without building the concatenation."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]
