"""Per-request timings for metrics (queue, first token, per output token, end to end), by adapter.

Queue length and running batch size are read from the scheduler; tokens per step go to the engine's ``on_step``
observers."""

from dataclasses import dataclass

from server.engine.request import Sequence


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


def finished_record(seq: Sequence) -> FinishedRecord:
    """The timings of a finished request, for the metrics observers."""
    assert seq.finish_reason is not None and seq.finished_at is not None
    first = seq.first_token_at
    n = len(seq.output_ids)
    return FinishedRecord(
        adapter=seq.adapter,
        finish_reason=seq.finish_reason.value,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=n,
        queue_seconds=None if seq.admitted_at is None else seq.admitted_at - seq.arrival,
        ttft_seconds=None if first is None else first - seq.arrival,
        tpot_seconds=None if first is None or n < 2 else (seq.finished_at - first) / (n - 1),
        e2e_seconds=seq.finished_at - seq.arrival,
    )
