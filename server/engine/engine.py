"""The engine: one loop that owns the model and runs every request together, step by step.

``step()`` reads like a table of contents: take new requests, schedule, make adapters resident (inside the
scheduler's admission), run the model once over the flattened batch, sample, and post-process (detokenize, stop,
stream, free finished rows).

Failures, from the smallest blast radius: a model or sampling error fails that step's batch; any other exception in
a step fails every request in flight and the loop goes on; ``MAX_FAILED_STEPS`` failing steps in a row, or an
exception while failing them, stop the engine for good (the watchdog in ``_run``): every request still held gets an
error, ``running`` turns false (``/ready`` answers 503) and ``submit`` raises ``EngineStoppedError``.
"""

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from server.engine.handle import RequestHandle, RequestOutput
from server.engine.model_runner import AcceleratorOutOfMemory, ModelRunner, SequenceChunk
from server.engine.request import FinishReason, Sequence, Status
from server.engine.sampling import INVALID_TOKEN, RowSampler, SamplingParams, sample
from server.engine.scheduler import Scheduler
from server.engine.stats import FinishedRecord, finished_record
from server.lora.prefetch import AdapterPrefetcher
from server.lora.slot_cache import SlotCache
from server.model.lora_model import LoraModel

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # steps in a row failing outside the model: the engine itself is broken, not one batch


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # running sequences (KV cache rows)
    max_seq_len: int = 2048  # prompt + generated tokens of one sequence
    max_tokens_per_step: int = 2048  # token budget of one forward pass (prompt chunks + decode tokens)
    cpu_slots: int = 64  # host copies of adapters kept behind the accelerator slots
    starvation_steps: int = 32  # steps the oldest waiting request may be passed over before it gets priority
    adapter_affinity: bool = True  # admit requests whose adapter is already running first (see Scheduler)
    max_queue: int = 1_000_000  # waiting requests; past it ``submit`` raises QueueFullError
    max_prompt_tokens: int | None = None  # per-request prompt limit (None: only max_seq_len bounds it)
    max_new_tokens: int | None = None  # per-request generation limit (None: only max_seq_len bounds it)
    request_timeout: float | None = None  # seconds from submission to finish; past it the request ends with TIMEOUT


class RequestError(ValueError):
    """A request the engine cannot take (too long, unknown adapter); the message is for the client."""


class UnknownAdapterError(RequestError):
    """The request names an adapter that is not registered."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine loop died after an internal error: this replica serves nothing more (the API answers 503)."""


@dataclass(eq=False)
class _Live:
    """Per-request post-processing state, owned by the engine thread."""

    seq: Sequence
    handle: RequestHandle
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    emitted: int = 0  # characters of text already streamed
    unsent: str = ""  # generated text not streamed yet: a possible start of a stop string (< the longest stop)


class Engine:
    def __init__(
        self,
        model: LoraModel,
        tokenizer: PreTrainedTokenizerBase,
        adapter_path: Callable[[str], Path],
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config if config is not None else EngineConfig()
        self.adapter_path = adapter_path
        max_tokens = max(config.max_tokens_per_step, config.max_batch_size)
        self.runner = ModelRunner(model, config.max_batch_size, config.max_seq_len, max_tokens)
        # Prefetched reads are host copies besides the CPU tier: --cpu-slots bounds both (one read at least, so a
        # waiting adapter can always be read when the CPU tier is off).
        self.prefetcher: AdapterPrefetcher = AdapterPrefetcher(
            lambda name: model.read_adapter(adapter_path(name)), capacity=max(1, config.cpu_slots)
        )
        self.slot_cache: SlotCache = SlotCache(model.num_slots, config.cpu_slots, self.prefetcher, model)
        self.scheduler = Scheduler(
            config.max_batch_size,
            max_tokens,
            self.slot_cache,
            self.prefetcher,
            config.starvation_steps,
            adapter_affinity=config.adapter_affinity,
        )
        # Observers (the metrics exporter): called on the engine thread, so they must be quick.
        self.on_finish: list[Callable[[FinishedRecord], None]] = []
        self.on_step: list[Callable[[int], None]] = []
        self.eos_ids = _eos_ids(model, tokenizer)
        self._live: dict[str, _Live] = {}
        self._inbox: list[_Live] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None  # why the loop died; set once, under _wake
        self._ids = itertools.count()

    # ---- submission (any thread) -------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Seq[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float | None = None,
    ) -> RequestHandle:
        """Queue a request; its outputs stream through the returned handle (async when ``loop`` is given).

        ``timeout`` (seconds, default ``config.request_timeout``) bounds the time from now to the last token; a
        request past it finishes with ``FinishReason.TIMEOUT``, whether it was still waiting or running."""
        params = params if params is not None else SamplingParams()
        config = self.config
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if config.max_prompt_tokens is not None and len(prompt_ids) > config.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the limit is {config.max_prompt_tokens}")
        if config.max_new_tokens is not None and params.max_new_tokens > config.max_new_tokens:
            raise RequestError(f"max_new_tokens is {params.max_new_tokens}; the limit is {config.max_new_tokens}")
        total = len(prompt_ids) + params.max_new_tokens
        if total > config.max_seq_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds "
                f"the maximum sequence length {config.max_seq_len}"
            )
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if adapter is not None:
            try:
                self.adapter_path(adapter)
            except KeyError:
                raise UnknownAdapterError(f"unknown adapter {adapter!r}") from None
        rid = request_id or f"req-{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        now = time.monotonic()
        timeout = timeout if timeout is not None else config.request_timeout
        seq = Sequence(rid, adapter, list(prompt_ids), params, arrival=now,
                       deadline=None if timeout is None else now + timeout)  # fmt: skip
        live = _Live(
            seq,
            RequestHandle(seq, loop),
            RowSampler(params),
            IncrementalDetokenizer(self.tokenizer, prompt_ids),
            StopChecker(params.stop),
        )
        with self._wake:
            if self._dead is not None:
                raise EngineStoppedError(self._dead)
            if len(self._inbox) + self.scheduler.num_waiting >= config.max_queue:
                raise QueueFullError(f"the queue holds {config.max_queue} waiting requests; retry later")
            self._inbox.append(live)
            self._wake.notify()
        return live.handle

    def queue_length(self) -> int:
        with self._wake:
            return len(self._inbox) + self.scheduler.num_waiting

    def forget_adapter(self, name: str) -> None:
        """The adapter was deleted: drop its host copies; its slot is cleared once running requests release it."""
        self.prefetcher.forget(name)
        self.slot_cache.invalidate(name)

    # ---- the step (engine thread) ------------------------------------------------------------------------------
    def step(self) -> int:
        """Run one engine iteration; returns the number of tokens processed (0 when idle)."""
        self._take_inbox()
        plan = self.scheduler.schedule()
        for seq in plan.aborted:
            self._finish_aborted(seq)
        for observe in self.on_step:
            observe(plan.num_tokens)
        if not plan.scheduled:
            return 0
        chunks = []
        for item in plan.scheduled:
            seq = item.seq
            end = seq.num_computed + item.num_tokens
            chunks.append(
                SequenceChunk(seq.row, seq.slot, seq.token_slice(seq.num_computed, end), seq.num_computed,
                              needs_logits=end == seq.num_tokens)
            )  # fmt: skip
        needing = [item.seq for item, chunk in zip(plan.scheduled, chunks, strict=True) if chunk.needs_logits]
        try:
            logits = self.runner.run(chunks)
            tokens = sample(logits, [self._live[s.request_id].sampler for s in needing])
        except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
            if isinstance(exc, AcceleratorOutOfMemory):
                log.warning("out of accelerator memory in a step of %d tokens: failing its requests", plan.num_tokens)
                error = f"out of accelerator memory ({exc}); retry later or with a shorter request"
            else:
                log.exception("model step failed")
                error = f"model error: {exc}"
            for item in plan.scheduled:
                self._finish(self._live[item.seq.request_id], FinishReason.ERROR, error=error)
            return 0
        for item in plan.scheduled:
            item.seq.num_computed += item.num_tokens
        for seq, token in zip(needing, tokens, strict=True):
            if token == INVALID_TOKEN:
                error = "the model produced non-finite scores for this request (NaN or infinite logits)"
                self._finish(self._live[seq.request_id], FinishReason.ERROR, error=error)
            else:
                self._append_token(self._live[seq.request_id], token)
        return plan.num_tokens

    def has_work(self) -> bool:
        with self._wake:
            return bool(self._inbox) or self.scheduler.has_work()

    def _take_inbox(self) -> None:
        with self._wake:
            new, self._inbox = self._inbox, []
        for live in new:
            self._live[live.seq.request_id] = live
            self.scheduler.add(live.seq)

    def _append_token(self, live: _Live, token: int) -> None:
        seq = live.seq
        now = time.monotonic()
        if not seq.output_ids:
            seq.first_token_at = now
        seq.output_ids.append(token)
        # Only the new delta and the held-back tail are looked at: the cost of a token does not grow with the text.
        delta = live.detokenizer.add(token)
        live.unsent += delta
        reason: FinishReason | None = None
        stop_at = live.stop.feed(delta)  # index in the whole text; never before what was streamed (held back)
        if stop_at is not None:
            reason = FinishReason.STOP
        elif token in self.eos_ids and not seq.params.ignore_eos:
            reason = FinishReason.EOS
        elif len(seq.output_ids) >= seq.params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            safe = len(live.unsent) - live.stop.holdback
            out, live.unsent = live.unsent[:safe], live.unsent[safe:]
            live.emitted += safe
            live.handle._push(RequestOutput(seq.request_id, (token,), out))
            return
        if stop_at is not None:
            rest = live.unsent[: stop_at - live.emitted]
        else:
            rest = live.unsent + live.detokenizer.flush()
        self._finish(live, reason, last_token=token, rest=rest)

    def _finish(
        self,
        live: _Live,
        reason: FinishReason,
        last_token: int | None = None,
        rest: str | None = None,
        error: str | None = None,
    ) -> None:
        """End ``live``: free its row and pin, stream ``rest`` (default: the held-back text) and the final event."""
        seq = live.seq
        self.scheduler.finish(seq, reason, error)
        delta = rest if rest is not None else live.unsent
        live.emitted, live.unsent = live.emitted + len(delta), ""
        # The client hears first: an observer that fails must not leave this request without its final event.
        live.handle._push(
            RequestOutput(
                seq.request_id,
                (last_token,) if last_token is not None else (),
                delta,
                finished=True,
                finish_reason=reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                error=error,
            )
        )
        self._live.pop(seq.request_id, None)
        record = finished_record(seq)
        for observe in self.on_finish:
            observe(record)

    def _finish_aborted(self, seq: Sequence) -> None:
        live = self._live.get(seq.request_id)
        if live is not None:
            assert seq.finish_reason is not None
            self._finish(live, seq.finish_reason, error=seq.error)

    # ---- the loop (a background thread) ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.prefetcher.close()

    @property
    def running(self) -> bool:
        """The loop is serving: started, alive and not stopped by the watchdog."""
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def stopped_reason(self) -> str | None:
        """Why the watchdog stopped the engine, or None while it has not."""
        return self._dead

    def _run(self) -> None:
        """The loop, under the watchdog: whatever ends it other than ``shutdown``, nobody is left waiting."""
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the last line of defence of every waiting client
            log.critical("the engine loop died; failing every request and refusing new ones", exc_info=True)
            self._stop_for_good(f"the engine stopped after an internal error ({type(exc).__name__}: {exc})")

    def _loop(self) -> None:
        failed_steps = 0
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.scheduler.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                idle = self.step() == 0
                failed_steps = 0
            except Exception as exc:  # noqa: BLE001 - the loop survives one failure; the requests in flight cannot
                failed_steps += 1
                if failed_steps >= MAX_FAILED_STEPS:
                    raise  # the same failure again and again: the engine is broken, let the watchdog stop it
                log.exception("engine step failed")
                self._fail_all(f"engine error: {exc}")
                continue
            if idle and self.scheduler.has_work():
                time.sleep(0.001)  # everything waits on an adapter read: do not spin

    def _stop_for_good(self, error: str) -> None:
        """Refuse new requests, then give every request still held its final event, an error (the API's 503).

        Touches no scheduler or detokenizer state: whatever failed may be broken."""
        with self._wake:
            self._dead = error
            held, self._inbox = [*self._inbox, *self._live.values()], []
        self._live = {}
        for live in held:
            seq = live.seq
            seq.status, seq.finish_reason, seq.error = Status.FINISHED, FinishReason.ERROR, error
            try:
                live.handle._push(RequestOutput(seq.request_id, (), "", finished=True,
                                                finish_reason=FinishReason.ERROR, prompt_tokens=len(seq.prompt_ids),
                                                completion_tokens=len(seq.output_ids), error=error))  # fmt: skip
            except Exception:  # noqa: BLE001 - one broken handle must not keep the others waiting
                log.exception("could not fail request %s", seq.request_id)

    def _fail_all(self, error: str) -> None:
        """Finish every request the engine holds with an error (after an unexpected failure in a step)."""
        self._take_inbox()
        for live in list(self._live.values()):  # every request here still waits for its final event
            seq = live.seq
            if seq.finish_reason is None:
                self._finish(live, FinishReason.ERROR, error=error)
            else:  # the scheduler had finished it (cancelled, timed out) but the failure came before it was told
                self._finish(live, seq.finish_reason, error=seq.error)


def _eos_ids(model: LoraModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)
