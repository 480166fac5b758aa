"""Engine statistics for metrics: queue and batch sizes, tokens per step, latency per request and adapter."""

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

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


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0
    last_batch_size: int = 0
    last_step_tokens: int = 0
    queue_length: int = 0
    finished: Counter[str] = field(default_factory=Counter)
    recent: deque[FinishedRecord] = field(default_factory=lambda: deque(maxlen=10_000))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_step(self, batch_size: int, num_tokens: int, queue_length: int) -> None:
        self.last_batch_size, self.last_step_tokens, self.queue_length = batch_size, num_tokens, queue_length
        if num_tokens:
            self.steps += 1
            self.tokens += num_tokens

    def record_finish(self, seq: Sequence) -> FinishedRecord:
        assert seq.finish_reason is not None and seq.finished_at is not None
        first = seq.first_token_at
        n = len(seq.output_ids)
        record = FinishedRecord(
            adapter=seq.adapter,
            finish_reason=seq.finish_reason.value,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=n,
            queue_seconds=None if seq.admitted_at is None else seq.admitted_at - seq.arrival,
            ttft_seconds=None if first is None else first - seq.arrival,
            tpot_seconds=None if first is None or n < 2 else (seq.finished_at - first) / (n - 1),
            e2e_seconds=seq.finished_at - seq.arrival,
        )
        with self._lock:
            self.finished[record.finish_reason] += 1
            self.recent.append(record)
        return record
