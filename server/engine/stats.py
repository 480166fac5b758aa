"""Per-request timings for metrics (queue, first token, per output token, end to end), by adapter.

Queue length and running batch size are read from the engine; tokens per step go to the engine's ``on_step``
observers."""

from dataclasses import dataclass

from server.engine.request import EngineRequest


@dataclass(frozen=True)
class FinishedRecord:
    """Timings of one finished request; ``adapter`` None is the base model."""

    adapter: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float | None  # arrival -> admitted into the batch
    ttft_seconds: float | None  # arrival -> first token
    tpot_seconds: float | None  # mean time per output token after the first
    e2e_seconds: float | None  # arrival -> finished


def finished_record(req: EngineRequest) -> FinishedRecord:
    """The timings of a finished request, for the metrics observers."""
    assert req.finish_reason is not None and req.finished_at is not None
    first = req.first_token_at
    n = len(req.output_ids)
    return FinishedRecord(
        adapter=req.adapter,
        finish_reason=req.finish_reason.value,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=n,
        queue_seconds=None if req.admitted_at is None else req.admitted_at - req.arrival,
        ttft_seconds=None if first is None else first - req.arrival,
        tpot_seconds=None if first is None or n < 2 else (req.finished_at - first) / (n - 1),
        e2e_seconds=req.finished_at - req.arrival,
    )


@dataclass(frozen=True)
class MemoryStats:
    """Where the engine's preallocated pools stand (read at scrape time). Counters are monotonic."""

    kv_blocks_used: int  # blocks held by running requests
    kv_blocks_cached: int  # blocks holding a cached prefix that no request uses (reused or evicted on demand)
    kv_blocks_free: int  # blocks holding nothing
    kv_block_bytes: int  # bytes of one block (every layer, K and V)
    prefix_hit_tokens: int  # tokens whose K/V came from the prefix cache instead of being computed (counter)
    preemptions: int  # running requests preempted for lack of KV blocks (counter)
    adapter_pool_bytes_used: int  # adapter weights resident on the accelerator
    adapter_pool_bytes_total: int  # the adapter pool's budget
    dominant_merges: int = 0  # --merge-dominant: adapters folded into the base weights (counter)
    dominant_unmerges: int = 0  # ... and unfolded again (counter)
