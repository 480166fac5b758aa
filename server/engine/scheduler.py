"""Adapter-aware continuous-batching scheduler (torch-free).

Every step: running sequences keep their place (one decode token each, or their next prompt chunk), then waiting
sequences are admitted while a KV row, token budget and an adapter slot are available. A waiting sequence whose
adapter is still being read from disk is skipped (the read runs on a worker thread) so it never blocks others.

Admission order: with ``adapter_affinity`` (the default), among the first ``AFFINITY_WINDOW`` waiting sequences the
oldest one whose adapter is already running (or that needs no adapter) goes first, because it adds no adapter
weights to a step's reads; otherwise the oldest waiting sequence goes next. Without affinity it is arrival order.
Either way, when the oldest waiting sequence has been passed over for ``starvation_steps`` steps, nothing else is
admitted until it is, whatever the adapter popularity.

Adapter reads: the prefetcher holds a bounded number of reads; the oldest waiting sequence may make room in it, and
a read is forgotten as soon as the last waiting sequence for its adapter leaves the queue (admitted, finished,
cancelled, timed out), so cancelled requests leave no host copies behind.
"""

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.request import FinishReason, Sequence, Status
from server.lora.errors import NoFreeSlotError
from server.lora.prefetch import AdapterPrefetcher
from server.lora.slot_cache import SlotCache
from server.lora.slots import BASE_SLOT

AFFINITY_WINDOW = 256  # waiting sequences searched for a running adapter: bounds the work of one admission


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens this step: a prompt chunk, or 1 when decoding


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    aborted: list[Sequence] = field(default_factory=list)  # finished this step without running (cancelled, failed)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        max_rows: int,
        max_tokens_per_step: int,
        slots: SlotCache,
        prefetcher: AdapterPrefetcher,
        starvation_steps: int = 32,
        clock: Callable[[], float] = time.monotonic,
        adapter_affinity: bool = True,
    ) -> None:
        if max_tokens_per_step < max_rows:
            raise ValueError("max_tokens_per_step must be at least max_rows so every running row can decode")
        self.max_rows = max_rows
        self.max_tokens_per_step = max_tokens_per_step
        self.slots = slots
        self.prefetcher = prefetcher
        self.starvation_steps = starvation_steps
        self.clock = clock
        self.adapter_affinity = adapter_affinity
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_rows = list(range(max_rows - 1, -1, -1))  # pop() hands out the lowest row first
        self._head: Sequence | None = None
        self._head_passed_over = 0
        self._waiting_for: Counter[str] = Counter()  # adapter -> waiting sequences that use it
        self._prefetched: set[str] = set()  # adapters whose read this scheduler asked the prefetcher for

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        if seq.adapter is not None:
            self._waiting_for[seq.adapter] += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._drop_abandoned(out)
        budget = self.max_tokens_per_step
        for seq in self.running:
            n = min(len(seq.prompt_ids) - seq.num_computed, budget) if seq.in_prefill else 1
            if n > 0:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        self._admit(out, budget)
        return out

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Mark ``seq`` finished and give back its KV row and adapter pin."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self._leave_queue(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.finished_at = self.clock()

    def _leave_queue(self, seq: Sequence) -> None:
        """Take ``seq`` out of the waiting queue; the last one waiting for an adapter drops its pending read."""
        self.waiting.remove(seq)
        name = seq.adapter
        if name is None:
            return
        self._waiting_for[name] -= 1
        if self._waiting_for[name] <= 0:
            del self._waiting_for[name]
            if name in self._prefetched:
                self._prefetched.discard(name)
                self.prefetcher.forget(name)

    def _release(self, seq: Sequence) -> None:
        assert seq.row is not None
        self._free_rows.append(seq.row)
        self._free_rows.sort(reverse=True)
        if seq.adapter is not None and seq.slot is not None:
            self.slots.release(seq.adapter, seq.slot)
        seq.row = None
        seq.slot = None

    def _drop_abandoned(self, out: SchedulerOutput) -> None:
        """Finish the sequences whose client cancelled them and those past their deadline, waiting or running."""
        now = self.clock()
        for seq in [*self.running, *self.waiting]:
            if seq.cancelled:
                self.finish(seq, FinishReason.CANCELLED)
                out.aborted.append(seq)
            elif seq.deadline is not None and now >= seq.deadline:
                self.finish(seq, FinishReason.TIMEOUT, "the request did not finish within its time limit")
                out.aborted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        head = self.waiting[0] if self.waiting else None
        if head is not self._head:
            self._head, self._head_passed_over = head, 0
        reserved = self._head_passed_over >= self.starvation_steps
        candidates = [head] if reserved and head is not None else list(self.waiting)
        affinity = self.adapter_affinity and not reserved
        window = candidates[:AFFINITY_WINDOW] if affinity else []

        def admit(seq: Sequence) -> bool:
            nonlocal budget
            if seq.status is not Status.WAITING or not self._free_rows or budget <= 0:
                return False
            slot = self._adapter_slot(seq, out, urgent=seq is head)
            if slot is None:
                return False
            self._leave_queue(seq)
            seq.row = self._free_rows.pop()
            seq.slot = slot
            seq.status = Status.RUNNING
            seq.admitted_at = self.clock()
            self.running.append(seq)
            n = min(len(seq.prompt_ids), budget)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            return True

        def admit_on(adapters: set[str | None]) -> None:
            for seq in window:
                if seq.adapter in adapters:
                    admit(seq)

        active = {seq.adapter for seq in self.running} | {None}
        if affinity:
            admit_on(active)
        for seq in candidates:
            if not self._free_rows or budget <= 0:
                break
            if admit(seq) and affinity and seq.adapter not in active:
                active.add(seq.adapter)
                admit_on({seq.adapter})  # its waiting siblings next, before another new adapter
        if self.waiting and self.waiting[0] is head:
            self._head_passed_over += 1

    def _adapter_slot(self, seq: Sequence, out: SchedulerOutput, urgent: bool) -> int | None:
        """The slot ``seq`` runs in, pinned; None when it must wait (adapter loading or every slot pinned).

        ``urgent``: ``seq`` is the oldest waiting sequence, whose read may displace a finished one (see prefetch)."""
        name = seq.adapter
        if name is None:
            return BASE_SLOT
        if self.slots.tier(name) == "disk":
            state = self.prefetcher.state(name)
            if state == "failed":
                self._fail(seq, self.prefetcher.error(name), out)
                return None
            if state != "ready":
                if self.prefetcher.request(name, urgent=urgent):
                    self._prefetched.add(name)
                return None
        try:
            return self.slots.acquire(name)
        except NoFreeSlotError:
            return None
        except Exception as exc:  # noqa: BLE001 - a bad adapter fails its own requests, never the loop
            self._fail(seq, exc, out)
            return None

    def _fail(self, seq: Sequence, error: BaseException | None, out: SchedulerOutput) -> None:
        """Finish ``seq`` because its adapter could not be read. The adapter source raises KeyError for an adapter
        that is no longer registered (deleted while the request waited): that is not a load failure."""
        if isinstance(error, KeyError):
            self.finish(seq, FinishReason.ADAPTER_DELETED, f"adapter {seq.adapter!r} was deleted")
        else:
            self.finish(seq, FinishReason.ERROR, f"adapter {seq.adapter!r} failed to load: {error}")
        out.aborted.append(seq)
