"""The model runner: the only code that turns scheduled sequences into tensors and runs the model."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.attention import AttentionContext, AttentionMetadata, PrefillSegment, install, sliding_window_of
from server.engine.errors import AcceleratorOutOfMemory
from server.engine.kv_cache import KVCache
from server.kernels.mapping import TokenSlotMapping
from server.model.lora_model import LoraModel
from server.model.packed_linear import warm_up


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: ``token_ids`` at positions ``start..``, KV ``row``, LoRA ``slot``."""

    row: int
    slot: int
    token_ids: Sequence[int]
    start: int
    needs_logits: bool  # the logits of the last position, to sample the next token from
    all_logits: bool = False  # the logits of every position (prompt log-probabilities)
    copy_from: tuple[int, int] | None = None  # (row, length): copy that row's first positions into ``row`` first

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
    """Owns the KV cache and runs one flattened forward pass per step over many sequences and adapters."""

    def __init__(self, lora_model: LoraModel, max_rows: int, max_len: int, max_tokens: int | None = None) -> None:
        """``max_rows`` sequences of up to ``max_len`` positions; a step runs at most ``max_tokens`` (default
        ``max_rows``) tokens, which only sizes the start-up warm-up of the CPU's packed-weight kernels."""
        self.lora_model = lora_model
        self.model = lora_model.model
        self.device = lora_model.device
        window = sliding_window_of(self.model.config)
        if window is not None and window < max_len:
            raise ValueError(
                f"the model uses sliding-window attention ({window} tokens), which the KV cache does not implement; "
                f"use a maximum sequence length of at most {window}"
            )
        self.cache = KVCache.for_model(self.model.config, max_rows, max_len, lora_model.dtype, self.device)
        self.attention = AttentionContext(self.cache)
        install(self.model, self.attention)
        warm_up(self.model, max(max_tokens or max_rows, max_rows), max_rows)  # CPU packed weights: no-op elsewhere
        # A prepared 4D mask makes transformers skip building its own; our attention ignores it.
        self._skip_mask = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=self.device)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def run(self, chunks: Sequence[SequenceChunk]) -> StepLogits:
        """Forward all chunks at once (after the KV row copies they ask for); see ``StepLogits``.

        Raises AcceleratorOutOfMemory (after emptying the allocator's cache) when the device runs out of memory."""
        try:
            return self._run(chunks)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise AcceleratorOutOfMemory(str(exc).splitlines()[0] if str(exc) else "out of memory") from None

    @torch.inference_mode()
    def _run(self, chunks: Sequence[SequenceChunk]) -> StepLogits:
        if not chunks:
            raise ValueError("nothing to run")
        for c in chunks:
            if c.copy_from is not None:
                self.cache.copy_prefix(c.copy_from[0], c.row, c.copy_from[1])
        # Decode tokens first, then prompt chunks, each part sorted by LoRA slot: every adapter's decode tokens form
        # one run, every prompt chunk another, and the decode tokens of a step one span (the LoRA grid's usual case).
        order = sorted(range(len(chunks)), key=lambda i: (len(chunks[i].token_ids) > 1, chunks[i].slot))
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSegment] = []
        decodes: list[tuple[int, int, int]] = []  # (row, flattened index, context length)
        keep: list[tuple[int, int]] = []  # (chunk index, flattened index) of each position whose logits are kept
        for i in order:
            c = chunks[i]
            if c.end > self.cache.max_len:
                raise ValueError(f"sequence needs {c.end} positions; the KV cache holds {self.cache.max_len}")
            first = len(ids)
            ids.extend(c.token_ids)
            positions.extend(range(c.start, c.end))
            rows.extend([c.row] * len(c.token_ids))
            slots.extend([c.slot] * len(c.token_ids))
            if len(c.token_ids) == 1:
                decodes.append((c.row, first, c.end))
            else:
                prefills.append(PrefillSegment(first, len(ids), c.row, c.end))
            if c.all_logits:
                keep.extend((i, t) for t in range(first, len(ids)))
            elif c.needs_logits:
                keep.append((i, len(ids) - 1))

        self.attention.metadata = self._metadata(rows, positions, prefills, decodes)
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
        rows: list[int],
        positions: list[int],
        prefills: list[PrefillSegment],
        decodes: list[tuple[int, int, int]],
    ) -> AttentionMetadata:
        device = self.device
        empty = torch.empty(0, dtype=torch.int64, device=device)
        decode_mask = None
        base = count = 0
        decode_index = decode_rows = empty
        if decodes:
            decodes.sort()
            base = decodes[0][0]
            count = decodes[-1][0] - base + 1
            length = max(ctx for _, _, ctx in decodes)
            contexts = [1] * count  # window rows without a decode token see key 0 only: finite, then discarded
            for row, _, ctx in decodes:
                contexts[row - base] = ctx
            ctx_t = torch.tensor(contexts, dtype=torch.int64, device=device)
            decode_mask = (torch.arange(length, device=device).unsqueeze(0) < ctx_t.unsqueeze(1)).view(
                count, 1, 1, length
            )
            decode_index = torch.tensor([t for _, t, _ in decodes], dtype=torch.int64, device=device)
            decode_rows = torch.tensor([row - base for row, _, _ in decodes], dtype=torch.int64, device=device)
        return AttentionMetadata(
            rows=torch.tensor(rows, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            prefills=tuple(prefills),
            decode_index=decode_index,
            decode_rows=decode_rows,
            decode_row_base=base,
            decode_row_count=count,
            decode_mask=decode_mask,
        )
