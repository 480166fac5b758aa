"""The engine: one loop that owns the model and runs every request together, step by step.

``step()`` reads like a table of contents: take new requests, schedule (admission reserves adapter slots), make the
reserved adapters resident (the device writes), prepare the step's chunks, run the model once over the flattened
batch, sample, and process the outputs (detokenize, stop, stream, free finished rows; see ``outputs``).

Submissions reach the steps through ``loop.EngineLoop``, which owns the engine thread and its watchdog (what
happens when steps fail).
"""

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server.adapters.checkpoint import AdapterWeights
from server.adapters.errors import AdapterError
from server.adapters.mixture import (
    MixtureChecks,
    MixtureCopies,
    MixtureError,
    cat_adapters,
    check_parts,
    parse_mixture_key,
)
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from server.engine.errors import RequestError, UnknownAdapterError, step_failure
from server.engine.handle import RequestHandle
from server.engine.kv_cache import PagedKVCache
from server.engine.kv_pool import kv_pool_blocks
from server.engine.logprob import TokenLogprob
from server.engine.logprobs import prompt_logprobs
from server.engine.loop import EngineLoop
from server.engine.merge_control import MergeController
from server.engine.merge_policy import MergePolicyConfig
from server.engine.merge_reads import parse_correction_key
from server.engine.model_runner import ModelRunner, SequenceChunk
from server.engine.outputs import LiveRequest, OutputProcessor
from server.engine.prefix_keys import PrefixKeys
from server.engine.request import EngineRequest
from server.engine.sampling import RowSampler, sample
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from server.engine.stats import FinishedRecord, MemoryStats
from server.engine.structured_output import CompiledGrammar
from server.lora.prefetch import AdapterPrefetcher
from server.lora.slot_cache import CacheStats, SlotCache
from server.model.lora_model import LoraModel


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # running sequences at most (a cap on rows; memory comes from the KV block pool)
    max_seq_len: int = 2048  # prompt + generated tokens of one sequence
    max_tokens_per_step: int = 2048  # token budget of one forward pass (prompt chunks + decode tokens)
    cpu_slots: int = 64  # host copies of adapters kept behind the accelerator slots
    starvation_steps: int = 32  # steps the oldest waiting request may be passed over before it gets priority
    adapter_affinity: bool = True  # admit requests whose adapter is already running first (see Scheduler)
    max_queue: int = 1_000_000  # waiting requests; past it ``submit`` raises QueueFullError
    max_prompt_tokens: int | None = None  # per-request prompt limit (None: only max_seq_len bounds it)
    max_new_tokens: int | None = None  # per-request generation limit (None: only max_seq_len bounds it)
    request_timeout: float | None = None  # seconds from submission to finish; past it the request ends with TIMEOUT
    kv_cache_bytes: int | None = None  # the KV block pool (None: see ``kv_pool_bytes``)
    block_size: int = 16  # positions per KV block
    prefix_caching: bool = True  # reuse computed KV blocks of equal prefixes (per adapter; see kv_sharing)
    merge_dominant: bool = False  # fold an adapter that holds most rows into the base weights (merge_control)
    merge_policy: MergePolicyConfig = MergePolicyConfig()  # when to merge and unmerge (merge_policy)


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
        self.block_bytes = block_bytes = PagedKVCache.block_bytes(model.model.config, config.block_size, model.dtype)
        self.preemptions = 0  # running requests preempted for lack of KV blocks (a counter, for metrics)
        num_blocks = kv_pool_blocks(config.kv_cache_bytes, block_bytes, config.block_size, config.max_batch_size,
                                    config.max_seq_len, model.device)  # fmt: skip
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.max_seq_len, config.max_batch_size,
                                  max_tokens)  # fmt: skip
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        # Prefetched reads are host copies besides the CPU tier: --cpu-slots bounds both (one read at least, so a
        # waiting adapter can always be read when the CPU tier is off).
        self.prefetcher: AdapterPrefetcher = AdapterPrefetcher(self._read_adapter, capacity=max(1, config.cpu_slots))
        self.slot_cache: SlotCache = SlotCache(model.num_slots, config.cpu_slots, self.prefetcher, model)
        self.scheduler = Scheduler(
            config.max_batch_size,
            max_tokens,
            self.slot_cache,
            self.prefetcher,
            self.blocks,
            config.starvation_steps,
            adapter_affinity=config.adapter_affinity,
        )
        self.prefix_keys = PrefixKeys(model, adapter_path)  # adapter -> prefix-cache namespace
        self.merge: MergeController | None = None  # merge_dominant: serving the dominant adapter merged
        if config.merge_dominant:
            self.merge = MergeController(model, self.slot_cache, self._read_adapter, config.merge_policy)
        self.mixtures = MixtureCopies(self._has_copy)  # mixture keys that may be cached: a part's delete drops them
        self.mixture_checks = MixtureChecks(model.modules)
        self.outputs = OutputProcessor(self.scheduler, _eos_ids(model, tokenizer))
        # Observers (the metrics exporter): called on the engine thread, so they must be quick.
        self.on_finish: list[Callable[[FinishedRecord], None]] = self.outputs.on_finish
        self.on_step: list[Callable[[int], None]] = []
        self.engine_loop: EngineLoop[LiveRequest] = EngineLoop(self)
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
        grammar: CompiledGrammar | None = None,
    ) -> RequestHandle:
        """Queue a request; its outputs stream through the returned handle (async when ``loop`` is given).

        ``timeout`` (seconds, default ``config.request_timeout``) bounds the time from now to the last token; a
        request past it finishes with ``FinishReason.TIMEOUT``, whether it was still waiting or running.
        ``grammar`` constrains the output (structured output); the request gets a matcher of its own."""
        params = params if params is not None else SamplingParams()
        [handle] = self.submit_group(prompt_ids, adapter, [params], request_id, loop, timeout, grammar)
        return handle

    def submit_group(
        self,
        prompt_ids: Seq[int],
        adapter: str | None,
        params: Seq[SamplingParams],
        request_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> list[RequestHandle]:
        """Queue one sequence per ``params`` on the same prompt (OpenAI's ``n``): the prompt is prefilled once and
        the other sequences start from a copy of its KV row. Each gets its own handle (ids ``<id>-<i>`` when more
        than one); all are accepted or none (the queue bound counts them all)."""
        if not params:
            raise ValueError("a group needs at least one sequence")
        for p in params:
            self._check(prompt_ids, adapter, p)
            if grammar is not None and (p.ignore_eos or p.min_tokens):
                # A complete grammar allows only end-of-sequence: min_tokens could leave no token to take, and
                # ignore_eos would pad the answer with end-of-sequence tokens up to max_tokens.
                raise RequestError("structured output cannot be combined with ignore_eos or min_tokens")
        rid = request_id or f"req-{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        now = time.monotonic()
        timeout = timeout if timeout is not None else self.config.request_timeout
        cache_key = self.prefix_keys.of(adapter)
        lives = []
        for i, p in enumerate(params):
            request = EngineRequest(rid if len(params) == 1 else f"{rid}-{i}", adapter, list(prompt_ids), p,
                                    arrival=now, deadline=None if timeout is None else now + timeout,
                                    cache_key=cache_key)  # fmt: skip
            lives.append(LiveRequest(
                request,
                RequestHandle(request, loop),
                RowSampler(p, request.prompt_ids, self.outputs.eos_ids, grammar.matcher() if grammar else None),
                IncrementalDetokenizer(self.tokenizer, prompt_ids, p.skip_special_tokens),
                StopChecker(p.stop),
            ))  # fmt: skip
        first = lives[0].request
        for live in lives[1:]:
            if live.request.params.prompt_logprobs is None:  # one that scores the prompt must compute it all
                live.request.fork_parent = first
        self.engine_loop.put(lives, self.scheduler.num_waiting, self.config.max_queue)
        return [live.handle for live in lives]

    def _check(self, prompt_ids: Seq[int], adapter: str | None, params: SamplingParams) -> None:
        """Refuse a request this engine cannot serve, with a message for the client (``RequestError``)."""
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
        if any(not 0 <= t < vocab for t in params.token_ids()):
            raise RequestError(f"logit_bias and stop_token_ids must name token ids in [0, {vocab})")
        if adapter is not None:
            self._check_adapter(adapter)

    def _check_adapter(self, adapter: str) -> None:
        """An adapter name, or a mixture key (``server.adapters.mixture``): every part registered, mixable (from their
        configs) and the mixture's rank within the adapter pool, else it would wait for rows that never free."""
        try:
            parts = parse_mixture_key(adapter)
            if parts is not None:
                check_parts(parts)
        except MixtureError as exc:
            raise RequestError(str(exc)) from None
        names = [adapter] if parts is None else [p.name for p in parts]
        folders = [(name, self._folder(name, parts is not None)) for name in names]
        if parts is None:
            return
        try:
            rows = self.mixture_checks.rows(folders)
        except (AdapterError, OSError) as exc:
            raise RequestError(f"cannot mix these adapters: {exc}") from None
        if rows > self.model.pool_rows:
            raise RequestError(f"the mixture has rank {rows}; the adapter pool holds {self.model.pool_rows} rank rows "
                               "in all (--adapter-cache-bytes)")  # fmt: skip

    def _folder(self, name: str, in_mixture: bool) -> Path:
        try:
            return self.adapter_path(name)
        except KeyError:
            raise UnknownAdapterError(f"unknown adapter {name!r}" + (" in the mixture" if in_mixture else "")) from None

    def _read_adapter(self, name: str) -> AdapterWeights:
        """Read adapter ``name`` from disk (loader thread), or a mixture key's parts, combined by ``cat_adapters``.
        A read that fails because the adapter (a part) was deleted meanwhile (its folder moved away under the reader)
        raises the registry's KeyError, so its requests end as ADAPTER_DELETED (404), not as a load failure (503)."""
        if self.merge is not None and parse_correction_key(name) is not None:
            return self.merge.read_correction(name)  # the correction of rows beside a merged adapter
        parts = parse_mixture_key(name)
        if parts is None:
            return self._read_one(name)
        with self.mixtures.reading(name, parts):
            weights = cat_adapters([(self._read_one(p.name), p.weight) for p in parts])
        return weights.pin_memory() if self.model.device.type == "cuda" else weights

    def _read_one(self, name: str) -> AdapterWeights:
        folder = self.adapter_path(name)  # KeyError once deleted
        try:
            return self.model.read_adapter(folder)
        except Exception:
            self.adapter_path(name)
            raise

    def _has_copy(self, name: str) -> bool:
        """Whether a read of ``name`` is held by the prefetcher or the slot cache. Prefetch state first: a read taken
        from the prefetcher is installed under the slot cache's lock, which ``tier`` waits for."""
        return self.prefetcher.state(name) != "absent" or self.slot_cache.tier(name) != "disk"

    def forget_adapter(self, name: str) -> None:
        """The adapter was deleted: drop its host copies, and those of every mixture made from it; a slot is cleared
        once running requests release it."""
        for key in [name, *self.mixtures.containing(name)]:
            self.prefetcher.forget(key)
            self.slot_cache.invalidate(key)
        self.prefix_keys.forget(name)  # a new upload under this name must not reuse the deleted one's KV blocks
        if self.merge is not None:
            self.merge.forget(name)

    def preload(self, name: str) -> bool:
        """Read adapter ``name`` (a name or a mixture key) into the CPU tier ahead of its requests, on the caller's
        thread (never the engine's); a no-op when a slot or the tier holds it. Raises the registry's KeyError for an
        unregistered adapter and the reader's errors for a broken one. True when a copy was read and kept."""
        if self._has_copy(name):
            return False
        start = time.perf_counter()
        weights = self._read_adapter(name)
        return self.slot_cache.add_host_copy(name, weights, time.perf_counter() - start)

    def drop_preloaded(self, name: str) -> None:
        """Drop the CPU tier's copy of ``name`` (routing no longer prefers this engine for it); a slot keeps its own."""
        self.slot_cache.drop_host_copy(name)

    # ---- read-only views (any thread), for /ready, metrics and the adapter API ----------------------------------
    @property
    def eos_ids(self) -> frozenset[int]:
        """The token ids that end a request (the model's generation config and the tokenizer's)."""
        return self.outputs.eos_ids

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits: every token id a request may name is below it."""
        return self.runner.vocab_size

    def queue_length(self) -> int:
        return self.engine_loop.queued() + self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def cache_stats(self) -> CacheStats:
        return self.slot_cache.stats

    def memory_stats(self) -> MemoryStats:
        """The KV block pool and the adapter pool, for metrics (read without the engine's lock: a scrape may see
        counts from two neighbouring steps)."""
        blocks, pool = self.blocks, self.slot_cache.usage()
        return MemoryStats(
            kv_blocks_used=blocks.num_used,
            kv_blocks_cached=blocks.num_cached,
            kv_blocks_free=blocks.num_free - blocks.num_cached,
            kv_block_bytes=self.block_bytes,
            prefix_hit_tokens=blocks.hit_tokens,
            preemptions=self.preemptions,
            adapter_pool_bytes_used=pool.bytes_used,
            adapter_pool_bytes_total=pool.bytes_total,
            dominant_merges=self.merge.stats.merges if self.merge is not None else 0,
            dominant_unmerges=self.merge.stats.unmerges if self.merge is not None else 0,
        )

    def adapter_tier(self, name: str) -> str:
        """Where adapter ``name`` is now: "gpu" (in a slot), "cpu" (a host copy) or "disk"."""
        return self.slot_cache.tier(name)

    def resident_counts(self) -> tuple[int, int]:
        """(adapters in a slot, host copies in the CPU tier)."""
        return self.slot_cache.tier_counts()

    # ---- the step (engine thread) ------------------------------------------------------------------------------
    def step(self) -> int:
        """Run one engine iteration; returns the number of tokens processed (0 when idle)."""
        self._take_new_requests()
        plan = self.scheduler.schedule()
        self.preemptions += len(plan.preempted)
        slot_of = self._make_adapters_resident(plan)
        self.outputs.finish_aborted(plan.aborted)
        self._observe(plan)
        if not plan.scheduled:
            return 0
        chunks, copies, needing = self._prepare(plan.scheduled, slot_of)
        try:
            logits = self.runner.run(chunks, copies)
            prompt_logprobs = self._prompt_logprobs(plan.scheduled, chunks, logits.positions)
            sampling = [r for r in needing if r.params.max_new_tokens > 0]
            sampled = sample(logits.sample, self.outputs.samplers(sampling))
        except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
            self.outputs.fail([item.req for item in plan.scheduled], step_failure(exc, plan.num_tokens))
            return 0
        self.scheduler.advance(plan.scheduled)
        for req, logprobs in prompt_logprobs:
            self.outputs.add_prompt_logprobs(req, logprobs)
        self.outputs.finish_scored(r for r in needing if r.params.max_new_tokens == 0)
        self.outputs.process(sampling, sampled)
        return plan.num_tokens

    def _take_new_requests(self) -> None:
        for live in self.engine_loop.take():
            self.outputs.add(live)
            self.scheduler.add(live.request)

    def _make_adapters_resident(self, plan: SchedulerOutput) -> dict[int, int]:
        """Write the adapters admission reserved into their slots; a failed write fails the requests that needed it.
        With ``merge_dominant`` the merge controller first merges or unmerges: returns its slot remap (a request's
        slot -> the slot its tokens use; empty: none)."""
        slot_of: dict[int, int] = {}
        if self.merge is not None:
            slot_of, failed = self.merge.before_step(plan.scheduled, self.scheduler.waiting)
        else:
            failed = self.slot_cache.make_resident()
        if failed:
            self.scheduler.drop_failed_loads(plan, failed)
        return slot_of

    def _observe(self, plan: SchedulerOutput) -> None:
        for observe in self.on_step:
            observe(plan.num_tokens)

    @staticmethod
    def _prepare(
        scheduled: Seq[ScheduledRequest], slot_of: dict[int, int]
    ) -> tuple[list[SequenceChunk], list[tuple[int, int]], list[EngineRequest]]:
        """The model runner's chunks for this step (each on its request's slot, or what ``slot_of`` maps it to), the
        KV block copies to make first (forked sequences), and the requests whose prompt is complete (they get a
        token, or, scoring only, finish)."""
        chunks = []
        copies: list[tuple[int, int]] = []
        needing = []
        for item in scheduled:
            req = item.req
            assert req.slot is not None, "a scheduled request holds an adapter slot"
            start = req.num_computed
            end = start + item.num_tokens
            last = end == req.num_tokens
            chunks.append(SequenceChunk(
                req.block_table, slot_of.get(req.slot, req.slot), req.token_slice(start, end), start,
                needs_logits=last and req.params.max_new_tokens > 0,
                all_logits=_scores_prompt(req, end),
            ))  # fmt: skip
            copies.extend(item.copy_blocks)
            if last:
                needing.append(req)
        return chunks, copies, needing

    @staticmethod
    def _prompt_logprobs(
        scheduled: Seq[ScheduledRequest], chunks: Seq[SequenceChunk], positions: Seq[torch.Tensor]
    ) -> list[tuple[EngineRequest, list[TokenLogprob | None]]]:
        """Log-probabilities of the prompt tokens each prompt chunk predicts (``prompt_logprobs`` requests only).

        A chunk at positions start..end predicts prompt tokens start+1..end (the last position of the prompt
        predicts the first generated token, scored by the sampler); the prompt's first token has no prediction.
        A request recomputing its prompt after a preemption reports only the positions it has not reported yet
        (``req.prompt_scored``)."""
        out: list[tuple[EngineRequest, list[TokenLogprob | None]]] = []
        wanting = [item for item, chunk in zip(scheduled, chunks, strict=True) if chunk.all_logits]  # as _prepare set
        for item, logits in zip(wanting, positions, strict=True):
            req, start = item.req, item.req.num_computed
            k = req.params.prompt_logprobs
            assert k is not None
            end = start + item.num_tokens
            first_target = max(start + 1, req.prompt_scored)  # tokens reported before a preemption are skipped
            targets = req.prompt_ids[first_target : end + 1]
            first: list[TokenLogprob | None] = [None] if req.prompt_scored == 0 else []  # token 0: no prediction
            out.append((req, first + list(prompt_logprobs(logits[first_target - 1 - start :], targets, k))))
            req.prompt_scored = max(req.prompt_scored, min(end + 1, len(req.prompt_ids)))
        return out

    # ---- what the loop drives (engine thread) ------------------------------------------------------------------
    def busy(self) -> bool:
        return self.scheduler.has_work()

    def has_work(self) -> bool:
        return self.engine_loop.has_work()

    def fail_all(self, error: str) -> None:
        """Finish every request the engine holds with an error (after an unexpected failure in a step)."""
        self._take_new_requests()
        self.outputs.fail_all(error)

    def abandon_all(self, inbox: Iterable[LiveRequest], error: str) -> None:
        self.outputs.abandon_all(inbox, error)

    # ---- lifetime ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine_loop.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.engine_loop.shutdown(timeout)
        self.prefetcher.close()
        if self.merge is not None:
            self.merge.close()

    @property
    def running(self) -> bool:
        """The loop is serving: started, alive and not stopped by the watchdog."""
        return self.engine_loop.running

    @property
    def stopped_reason(self) -> str | None:
        """Why the watchdog stopped the engine, or None while it has not."""
        return self.engine_loop.stopped_reason


def _scores_prompt(req: EngineRequest, end: int) -> bool:
    """Whether the chunk of ``req`` ending at position ``end`` predicts prompt tokens whose log-probs are still to
    report (``req.prompt_scored``: prompt tokens reported so far; a chunk ending at ``end`` reaches token ``end``)."""
    return req.params.prompt_logprobs is not None and min(end + 1, len(req.prompt_ids)) > req.prompt_scored


def _eos_ids(model: LoraModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)
