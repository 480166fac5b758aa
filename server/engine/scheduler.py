"""Adapter-aware continuous-batching scheduler (torch-free).

Every step: running requests keep their place (one decode token each, or their next prompt chunk), then waiting
requests are admitted while a KV row, token budget and an adapter slot are available. A waiting request whose
adapter is still being read from disk is skipped (the read runs on a worker thread) so it never blocks others.
Admission only *reserves* an adapter slot (``Slots.reserve``: a pin and a decision); the engine writes the weights
to the device before the step runs, and a write that fails comes back here (``drop_failed_loads``).

Admission order: with ``adapter_affinity`` (the default), among the first ``AFFINITY_WINDOW`` waiting requests the
oldest one whose adapter is already running (or that needs no adapter) goes first, because it adds no adapter
weights to a step's reads; otherwise the oldest waiting request goes next. Without affinity it is arrival order.
Either way, when the oldest waiting request has been passed over for ``starvation_steps`` steps, nothing else is
admitted until it is, whatever the adapter popularity.

Adapter reads: the prefetcher holds a bounded number of reads; the oldest waiting request may make room in it, and
a read is forgotten as soon as the last waiting request for its adapter leaves the queue (admitted, finished,
cancelled, timed out), so cancelled requests leave no host copies behind.
"""

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.request import EngineRequest, FinishReason, Status
from server.kernels.slots import BASE_SLOT
from server.lora.slot_cache import NoFreeSlotError

AFFINITY_WINDOW = 256  # waiting requests searched for a running adapter: bounds the work of one admission


class Slots(Protocol):
    """What admission needs from the slot cache (``SlotCache``): decisions only, the device write comes later."""

    def tier(self, name: str) -> str:
        """Where ``name`` is: "gpu" (in a slot), "cpu" (a host copy) or "disk"."""

    def reserve(self, name: str) -> int:
        """Pin ``name`` in a slot (written to the device later); raises ``NoFreeSlotError`` when all are pinned."""

    def release(self, name: str, slot: int | None = None) -> None:
        """Unpin one ``reserve`` of ``name`` in ``slot``."""


class AdapterReads(Protocol):
    """What admission needs from the background adapter reader (``AdapterPrefetcher``)."""

    def state(self, name: str) -> str:
        """The read of ``name``: "absent", "pending", "ready" or "failed"."""

    def request(self, name: str, urgent: bool = False) -> bool:
        """Start reading ``name``; False when nothing is held for it and nothing could start."""

    def error(self, name: str) -> BaseException | None:
        """A failed read's error, forgotten as it is returned."""

    def forget(self, name: str) -> None:
        """Drop whatever is pending or held for ``name``."""


@dataclass(frozen=True)
class ScheduledRequest:
    req: EngineRequest
    num_tokens: int  # new tokens this step: a prompt chunk, or 1 when decoding
    # (source row, positions): copy that many positions of the source's KV row into this request's row before the
    # step runs (a sequence forked from another on the same prompt; see EngineRequest.fork_parent).
    fork_from: tuple[int, int] | None = None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    aborted: list[EngineRequest] = field(default_factory=list)  # finished this step without running (cancelled, failed)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


def _fork_length(req: EngineRequest) -> int | None:
    """Prompt positions ``req`` copies from its fork parent at admission (0: prefill it all), or None: wait."""
    parent = req.fork_parent
    if parent is None:
        return 0
    if parent.status is Status.FINISHED:  # the parent's row is gone: prefill on its own
        req.fork_parent = None
        return 0
    return req.fork_length


class Scheduler:
    def __init__(
        self,
        max_rows: int,
        max_tokens_per_step: int,
        slots: Slots,
        prefetcher: AdapterReads,
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
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._free_rows = list(range(max_rows - 1, -1, -1))  # pop() hands out the lowest row first
        self._head: EngineRequest | None = None
        self._head_passed_over = 0
        self._waiting_for: Counter[str] = Counter()  # adapter -> waiting requests that use it
        self._prefetched: set[str] = set()  # adapters whose read this scheduler asked the prefetcher for

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: EngineRequest) -> None:
        self.waiting.append(req)
        if req.adapter is not None:
            self._waiting_for[req.adapter] += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._drop_abandoned(out)
        budget = self.max_tokens_per_step
        for req in self.running:
            n = min(len(req.prompt_ids) - req.num_computed, budget) if req.in_prefill else 1
            if n > 0:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
        self._admit(out, budget)
        return out

    def finish(self, req: EngineRequest, reason: FinishReason, error: str | None = None) -> None:
        """Mark ``req`` finished and give back its KV row and adapter pin."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is Status.WAITING and req in self.waiting:
            self._leave_queue(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.finished_at = self.clock()

    def drop_failed_loads(self, out: SchedulerOutput, failed: Mapping[int, BaseException]) -> None:
        """The adapter writes into the slots ``failed`` (slot -> error) did not happen: finish the requests this step
        scheduled on them (their row and pin go back) and move them from ``out.scheduled`` to ``out.aborted``."""
        kept = []
        for item in out.scheduled:
            req = item.req
            error = failed.get(req.slot) if req.slot is not None and req.adapter is not None else None
            if error is None:
                kept.append(item)
            else:
                self._fail(req, error, out)
        out.scheduled = kept

    def _leave_queue(self, req: EngineRequest) -> None:
        """Take ``req`` out of the waiting queue; the last one waiting for an adapter drops its pending read."""
        self.waiting.remove(req)
        name = req.adapter
        if name is None:
            return
        self._waiting_for[name] -= 1
        if self._waiting_for[name] <= 0:
            del self._waiting_for[name]
            if name in self._prefetched:
                self._prefetched.discard(name)
                self.prefetcher.forget(name)

    def _release(self, req: EngineRequest) -> None:
        assert req.row is not None
        self._free_rows.append(req.row)
        self._free_rows.sort(reverse=True)
        if req.adapter is not None and req.slot is not None:
            self.slots.release(req.adapter, req.slot)
        req.row = None
        req.slot = None

    def _drop_abandoned(self, out: SchedulerOutput) -> None:
        """Finish the requests whose client cancelled them and those past their deadline, waiting or running."""
        now = self.clock()
        for req in [*self.running, *self.waiting]:
            if req.cancelled:
                self.finish(req, FinishReason.CANCELLED)
                out.aborted.append(req)
            elif req.deadline is not None and now >= req.deadline:
                self.finish(req, FinishReason.TIMEOUT, "the request did not finish within its time limit")
                out.aborted.append(req)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        head = self.waiting[0] if self.waiting else None
        if head is not self._head:
            self._head, self._head_passed_over = head, 0
        reserved = self._head_passed_over >= self.starvation_steps
        candidates = [head] if reserved and head is not None else list(self.waiting)
        affinity = self.adapter_affinity and not reserved
        window = candidates[:AFFINITY_WINDOW] if affinity else []

        def admit(req: EngineRequest) -> bool:
            nonlocal budget
            if req.status is not Status.WAITING or not self._free_rows or budget <= 0:
                return False
            fork = _fork_length(req)
            if fork is None:
                return False  # its fork parent is still prefilling the shared prompt: wait for it, others go on
            slot = self._adapter_slot(req, out, urgent=req is head)
            if slot is None:
                return False
            self._leave_queue(req)
            req.row = self._free_rows.pop()
            req.slot = slot
            req.status = Status.RUNNING
            req.admitted_at = self.clock()
            self.running.append(req)
            fork_from = None
            if fork:
                assert req.fork_parent is not None and req.fork_parent.row is not None
                fork_from = (req.fork_parent.row, fork)
                req.num_computed = fork  # the copy is made before this step runs
            n = min(len(req.prompt_ids) - req.num_computed, budget)
            out.scheduled.append(ScheduledRequest(req, n, fork_from))
            budget -= n
            return True

        def admit_on(adapters: set[str | None]) -> None:
            for req in window:
                if req.adapter in adapters:
                    admit(req)

        active = {req.adapter for req in self.running} | {None}
        if affinity:
            admit_on(active)
        for req in candidates:
            if not self._free_rows or budget <= 0:
                break
            if admit(req) and affinity and req.adapter not in active:
                active.add(req.adapter)
                admit_on({req.adapter})  # its waiting siblings next, before another new adapter
        if self.waiting and self.waiting[0] is head:
            self._head_passed_over += 1

    def _adapter_slot(self, req: EngineRequest, out: SchedulerOutput, urgent: bool) -> int | None:
        """The slot ``req`` runs in, pinned; None when it must wait (adapter loading or every slot pinned).

        ``urgent``: ``req`` is the oldest waiting request, whose read may displace a finished one (see prefetch)."""
        name = req.adapter
        if name is None:
            return BASE_SLOT
        if self.slots.tier(name) == "disk":
            state = self.prefetcher.state(name)
            if state == "failed":
                self._fail(req, self.prefetcher.error(name), out)
                return None
            if state != "ready":
                if self.prefetcher.request(name, urgent=urgent):
                    self._prefetched.add(name)
                return None
        try:
            return self.slots.reserve(name)
        except NoFreeSlotError:
            return None
        except Exception as exc:  # noqa: BLE001 - a bad adapter fails its own requests, never the loop
            self._fail(req, exc, out)
            return None

    def _fail(self, req: EngineRequest, error: BaseException | None, out: SchedulerOutput) -> None:
        """Finish ``req`` because its adapter could not be read or written. The source raises KeyError for an adapter
        that is no longer registered (deleted while the request waited): that is not a load failure."""
        if isinstance(error, KeyError):
            self.finish(req, FinishReason.ADAPTER_DELETED, f"adapter {req.adapter!r} was deleted")
        else:
            self.finish(req, FinishReason.ERROR, f"adapter {req.adapter!r} failed to load: {error}")
        out.aborted.append(req)
