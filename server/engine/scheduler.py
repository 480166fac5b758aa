"""Adapter-aware continuous-batching scheduler (torch-free).

Every step: running requests keep their place, each with its next tokens (``num_tokens - num_computed``: a prompt
chunk, one decode token, or a preempted request's recomputation) within the token budget, and KV blocks for them;
when the pool runs dry, the most recently admitted one is *preempted* (its blocks and adapter pin go back; it waits
at the front of the queue to recompute, from its own blocks if the prefix cache kept them). Then, unless this step
preempted, waiting requests are admitted while rows, token budget, adapter slots and KV blocks (past a watermark,
so admission does not cause preemption) last; the first that finds too few blocks ends admission (no overtaking on
memory). One whose adapter is being read from disk (on a worker thread) is skipped, never blocking others.
Admission only *reserves* an adapter slot; the engine writes the weights, and a failed write comes back here.

Admission order: with ``adapter_affinity`` (the default), among the first ``AFFINITY_WINDOW`` waiting requests the
oldest one whose adapter is already running (or that needs no adapter) goes first: it adds no adapter weights to a
step's reads; else the oldest waiting request goes next (without affinity: arrival order). Either way, once the
oldest waiting request has been passed over for ``starvation_steps`` steps, nothing else is admitted until it is.

Adapter reads: the prefetcher holds a bounded number of reads; the oldest waiting request may make room in it, and a
read is forgotten once the last waiting request for its adapter leaves the queue (admitted, finished, cancelled,
timed out), so cancelled requests leave no host copies behind.
"""

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.block_manager import BlockManager
from server.engine.request import EngineRequest, FinishReason, Status
from server.kernels.slots import BASE_SLOT
from server.lora.slot_cache import NoFreeSlotError

AFFINITY_WINDOW = 256  # waiting requests searched for a running adapter: bounds the work of one admission
WATERMARK = 0.01  # of the KV blocks, left free by admission while requests run (vLLM's default)


class Slots(Protocol):
    """What admission needs from the slot cache (``SlotCache``): decisions only, the device write comes later."""

    # Where ``name`` is: "gpu" (in a slot), "cpu" (a host copy) or "disk".
    def tier(self, name: str) -> str: ...
    # Pin ``name`` in a slot (written to the device later); raises ``NoFreeSlotError`` when all are pinned.
    def reserve(self, name: str) -> int: ...
    def release(self, name: str, slot: int | None = None) -> None: ...  # unpin one ``reserve`` of ``name``


class AdapterReads(Protocol):
    """What admission needs from the background adapter reader (``AdapterPrefetcher``)."""

    # The read of ``name``: "absent", "pending", "ready" or "failed".
    def state(self, name: str) -> str: ...
    # Start reading ``name``; False when nothing is held for it and nothing could start.
    def request(self, name: str, urgent: bool = False) -> bool: ...
    # A failed read's error, forgotten as it is returned.
    def error(self, name: str) -> BaseException | None: ...
    # Drop whatever is pending or held for ``name``.
    def forget(self, name: str) -> None: ...


@dataclass(frozen=True)
class ScheduledRequest:
    req: EngineRequest
    num_tokens: int  # tokens computed this step, from req.num_computed: a prompt chunk, 1 when decoding
    # (source, destination) KV blocks to copy before the step runs: a fork's partial last prompt block (fork_parent)
    copy_blocks: tuple[tuple[int, int], ...] = ()


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    aborted: list[EngineRequest] = field(default_factory=list)  # finished this step without running (cancelled, failed)
    preempted: list[EngineRequest] = field(default_factory=list)  # sent back to the queue; they recompute later

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        max_rows: int,
        max_tokens_per_step: int,
        slots: Slots,
        prefetcher: AdapterReads,
        blocks: BlockManager,
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
        self.blocks = blocks
        self.watermark = int(WATERMARK * blocks.num_blocks)
        self.starvation_steps = starvation_steps
        self.clock = clock
        self.adapter_affinity = adapter_affinity
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
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

    def add(self, req: EngineRequest, front: bool = False) -> None:
        (self.waiting.appendleft if front else self.waiting.append)(req)
        if req.adapter is not None:
            self._waiting_for[req.adapter] += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._drop_abandoned(out)
        # Every decoding row gets its token (max_tokens_per_step >= max_rows); prompt chunks share what is left, so a
        # long prompt never stalls the decodes behind it.
        decoding = sum(1 for req in self.running if req.num_tokens - req.num_computed == 1)
        budget = self.max_tokens_per_step - decoding
        for req in list(self.running):
            left = req.num_tokens - req.num_computed
            n = 1 if left == 1 else min(left, budget)
            if req.status is not Status.RUNNING or n <= 0 or not self._grow(req, n, out):
                continue  # preempted this step, nothing to run (or no budget left), or preempted now
            out.scheduled.append(ScheduledRequest(req, n))
            if left > 1:
                budget -= n
        if not out.preempted:  # the blocks just freed would be handed straight back: admit next step
            self._admit(out, budget)
        return out

    def advance(self, scheduled: list[ScheduledRequest]) -> None:
        """The step ran: its tokens' K/V is in the cache (and full blocks enter the prefix cache)."""
        for item in scheduled:
            item.req.num_computed += item.num_tokens
            self.blocks.register_computed(item.req)

    def finish(self, req: EngineRequest, reason: FinishReason, error: str | None = None) -> None:
        """Mark ``req`` finished and give back its KV blocks and adapter pin."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is Status.WAITING and req in self.waiting:
            self._leave_queue(req)
        req.status = Status.FINISHED
        req.finish_reason, req.error = reason, error
        req.finished_at = self.clock()

    def drop_failed_loads(self, out: SchedulerOutput, failed: Mapping[int, BaseException]) -> None:
        """The adapter writes into the slots ``failed`` (slot -> error) did not happen: finish the requests this step
        scheduled on them (their blocks and pin go back) and move them from ``out.scheduled`` to ``out.aborted``."""
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
        self.blocks.free(req)
        if req.adapter is not None and req.slot is not None:
            self.slots.release(req.adapter, req.slot)
        req.slot = None

    def _grow(self, req: EngineRequest, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give ``req`` blocks for ``num_tokens``, preempting the newest running requests; False if it went too."""
        while not self.blocks.grow(req, num_tokens):
            victim = self.running.pop()
            self._release(victim)
            victim.status, victim.num_computed = Status.WAITING, 0
            victim.num_preemptions += 1
            self.add(victim, front=True)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

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
        blocked = False  # a request found too few free KV blocks: none after it may take them

        def full() -> bool:
            return blocked or len(self.running) >= self.max_rows or budget <= 0

        def admit(req: EngineRequest) -> bool:
            nonlocal budget, blocked
            if full() or req.status is not Status.WAITING:
                return False
            fork = req.fork_start()
            if fork is None:
                return False  # its fork parent is still prefilling the shared prompt: wait for it, others go on
            blocks = self.blocks
            prefix = blocks.fork_prefix(req.fork_parent, fork) if req.fork_parent and fork else blocks.lookup(req)
            n = min(req.num_tokens - prefix.tokens, budget)
            if blocks.admission_blocks(prefix, n) > blocks.num_free - (self.watermark if self.running else 0):
                blocked = True
                return False
            slot = self._adapter_slot(req, out, urgent=req is head)
            if slot is None:
                return False
            self._leave_queue(req)
            copies = blocks.admit(req, prefix, n)
            req.num_computed = prefix.tokens  # shared blocks hold them (a copied block: before this step runs)
            req.num_cached_tokens = prefix.tokens if prefix.lookup else 0
            req.slot, req.status = slot, Status.RUNNING
            req.admitted_at = self.clock() if req.admitted_at is None else req.admitted_at  # a resumed one keeps it
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, tuple(copies)))
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
            if full():
                break
            if admit(req) and affinity and req.adapter not in active:
                active.add(req.adapter)
                admit_on({req.adapter})  # its waiting siblings next, before another new adapter
        if self.waiting and self.waiting[0] is head:
            self._head_passed_over += 1

    def _adapter_slot(self, req: EngineRequest, out: SchedulerOutput, urgent: bool) -> int | None:
        """The slot ``req`` runs in, pinned; None when it must wait (adapter loading or every slot pinned). ``urgent``:
        ``req`` is the oldest waiting request, whose read may displace a finished one (see prefetch)."""
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
