"""The model runner: the only code that turns scheduled sequences into tensors and runs the model."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.attention import AttentionContext, AttentionMetadata, PrefillSegment, install, sliding_window_of
from server.engine.errors import AcceleratorOutOfMemory
from server.engine.kv_cache import PagedKVCache
from server.kernels.mapping import TokenSlotMapping
from server.model.lora_model import LoraModel
from server.model.packed_linear import warm_up


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: ``token_ids`` at positions ``start..``, LoRA ``slot``, and the sequence's
    ``block_table`` (KV block ids in position order, covering at least ``end`` positions)."""

    block_table: Sequence[int]
    slot: int
    token_ids: Sequence[int]
    start: int
    needs_logits: bool  # the logits of the last position, to sample the next token from
    all_logits: bool = False  # the logits of every position (prompt log-probabilities)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class StepLogits:
    """What one step's forward pass returns.

    sample: [N, vocab] float32, the last position of each chunk with ``needs_logits``, in chunk order.
    positions: for each chunk with ``all_logits``, in chunk order, [len(token_ids), vocab] float32 (one row per
    position; the last equals that chunk's ``sample`` row when it also needs logits).
    """

    sample: torch.Tensor
    positions: list[torch.Tensor]


class ModelRunner:
    """Owns the paged KV cache and runs one flattened forward pass per step over many sequences and adapters."""

    def __init__(
        self,
        lora_model: LoraModel,
        num_blocks: int,
        block_size: int,
        max_len: int,
        max_rows: int,
        max_tokens: int | None = None,
    ) -> None:
        """A pool of ``num_blocks`` KV blocks of ``block_size`` positions; sequences of up to ``max_len`` positions;
        ``max_rows`` sequences and ``max_tokens`` (default ``max_rows``) tokens a step, which only size the start-up
        warm-up of the CPU's packed-weight kernels."""
        self.lora_model = lora_model
        self.model = lora_model.model
        self.device = lora_model.device
        window = sliding_window_of(self.model.config)
        if window is not None and window < max_len:
            raise ValueError(
                f"the model uses sliding-window attention ({window} tokens), which the KV cache does not implement; "
                f"use a maximum sequence length of at most {window}"
            )
        self.max_len = max_len
        self.cache = PagedKVCache.for_model(self.model.config, num_blocks, block_size, lora_model.dtype, self.device)
        self.attention = AttentionContext(self.cache, max_len)
        install(self.model, self.attention)
        warm_up(self.model, max(max_tokens or max_rows, max_rows), max_rows)  # CPU packed weights: no-op elsewhere
        # A prepared 4D mask makes transformers skip building its own; our attention ignores it.
        self._skip_mask = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=self.device)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def run(self, chunks: Sequence[SequenceChunk], copies: Sequence[tuple[int, int]] = ()) -> StepLogits:
        """Copy the KV blocks ``copies`` asks for ((src, dst) pairs, e.g. a forked sequence's partial last block),
        then forward all chunks at once; see ``StepLogits``.

        Raises AcceleratorOutOfMemory (after emptying the allocator's cache) when the device runs out of memory."""
        try:
            return self._run(chunks, copies)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise AcceleratorOutOfMemory(str(exc).splitlines()[0] if str(exc) else "out of memory") from None

    @torch.inference_mode()
    def _run(self, chunks: Sequence[SequenceChunk], copies: Sequence[tuple[int, int]]) -> StepLogits:
        if not chunks:
            raise ValueError("nothing to run")
        self.cache.copy_blocks(copies)
        # Decode tokens first, then prompt chunks, each part sorted by LoRA slot: every adapter's decode tokens form
        # one run, every prompt chunk another, and the decode tokens of a step one span (the LoRA grid's usual case)
        # and the first tokens of the batch (the attention's decode kernel reads them as one block).
        order = sorted(range(len(chunks)), key=lambda i: (len(chunks[i].token_ids) > 1, chunks[i].slot))
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_index: list[int] = []
        slots: list[int] = []
        prefills: list[tuple[int, int, SequenceChunk]] = []  # (first, end) flattened indices of each prompt chunk
        decodes: list[SequenceChunk] = []
        keep: list[tuple[int, int]] = []  # (chunk index, flattened index) of each position whose logits are kept
        for i in order:
            c = chunks[i]
            if c.end > self.max_len:
                raise ValueError(f"sequence needs {c.end} positions; the runner accepts at most {self.max_len}")
            if len(c.block_table) * bs < c.end:
                raise ValueError(f"a block table of {len(c.block_table)} blocks cannot hold {c.end} positions")
            first = len(ids)
            ids.extend(c.token_ids)
            positions.extend(range(c.start, c.end))
            table = c.block_table
            slot_index.extend(table[p // bs] * bs + p % bs for p in range(c.start, c.end))
            slots.extend([c.slot] * len(c.token_ids))
            if len(c.token_ids) == 1:
                decodes.append(c)
            else:
                prefills.append((first, len(ids), c))
            if c.all_logits:
                keep.extend((i, t) for t in range(first, len(ids)))
            elif c.needs_logits:
                keep.append((i, len(ids) - 1))

        self.attention.metadata = self._metadata(slot_index, prefills, decodes)
        device = self.device
        input_ids = torch.tensor([ids], dtype=torch.int64, device=device)
        position_ids = torch.tensor([positions], dtype=torch.int64, device=device)
        keep.sort()
        keep_index = torch.tensor([t for _, t in keep], dtype=torch.int64, device=device)
        lora_step = self.lora_model.prepare(TokenSlotMapping.build(slots, device))  # the active op's metadata
        try:
            with self.lora_model.using(lora_step):
                out = self.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    attention_mask=self._skip_mask,
                    logits_to_keep=keep_index,
                    use_cache=False,
                )
        finally:
            self.attention.metadata = None
        logits = out.logits[0].float()  # [K, vocab], chunk order because ``keep`` was sorted by chunk index
        if not any(c.all_logits for c in chunks):
            return StepLogits(logits, [])
        sample_rows: list[int] = []
        every: list[torch.Tensor] = []
        at = 0
        for c in chunks:
            if c.all_logits:
                every.append(logits[at : at + len(c.token_ids)])
                at += len(c.token_ids)
                if c.needs_logits:
                    sample_rows.append(at - 1)
            elif c.needs_logits:
                sample_rows.append(at)
                at += 1
        return StepLogits(logits[sample_rows], every)

    def _metadata(
        self,
        slot_index: list[int],
        prefills: list[tuple[int, int, SequenceChunk]],
        decodes: list[SequenceChunk],
    ) -> AttentionMetadata:
        device = self.device
        bs = self.cache.block_size
        segments = []
        for first, end, c in prefills:
            fresh = c.start == 0  # the whole context is in this step: no pool read
            needed = -(-c.end // bs)
            blocks = None if fresh else torch.tensor(c.block_table[:needed], dtype=torch.int64, device=device)
            segments.append(PrefillSegment(first, end, c.end, blocks))
        width = max((-(-c.end // bs) for c in decodes), default=0)
        tables = [list(c.block_table[:width]) + [0] * (width - min(width, len(c.block_table))) for c in decodes]
        return AttentionMetadata(
            slot_index=torch.tensor(slot_index, dtype=torch.int64, device=device),
            prefills=tuple(segments),
            num_decodes=len(decodes),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device).view(len(decodes), width),
            context_lens=torch.tensor([c.end for c in decodes], dtype=torch.int32, device=device),
            max_context=max((c.end for c in decodes), default=0),
        )
