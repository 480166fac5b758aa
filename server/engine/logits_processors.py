"""What changes a row's logits before temperature: penalties, ``logit_bias`` and ``min_tokens``, batched over the rows
that ask for them (a batch where no row asks costs one Python check per row and no tensor work).

Definitions (``SamplingParams`` documents the fields), applied in this order:
- ``repetition_penalty`` r on every token of prompt + output, as Hugging Face's ``RepetitionPenaltyLogitsProcessor``:
  ``logit < 0 -> logit * r, else logit / r`` (at most once per token, however often it occurs);
- ``frequency_penalty`` f and ``presence_penalty`` p on the output tokens, as vLLM and OpenAI:
  ``logit -= f * count + p * (count > 0)``;
- ``logit_bias``: ``logit[id] += bias``;
- ``min_tokens``: while fewer tokens than that were generated, the stop token ids and the end-of-sequence ids (unless
  ``ignore_eos``: EOS then ends nothing, as in vLLM) get -inf.

Per-row device state (output token counts, the prompt's token set, bias and held-back ids) is built once per request
on the logits' device and the counts are brought up to date incrementally: a step costs O(new tokens) per row, not
O(sequence length).
"""

import math
from collections.abc import Sequence

import torch

from server.engine.sampling_params import SamplingParams


class RowHistory:
    """The tokens one request has seen (``prompt_ids``, ``output_ids``) and the device tensors derived from them.

    ``output_ids`` is appended to by the sampler's ``record``; the tensors are created lazily on the first device
    that asks and must stay on it.
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: Sequence[int] = (), eos_ids: frozenset[int] = frozenset()
    ) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self._ends = sorted(ends)  # what min_tokens holds back
        self.counts_output = bool(params.presence_penalty or params.frequency_penalty or self.repeats)
        self._device: torch.device | None = None
        self._counts: torch.Tensor | None = None  # [V] float32: occurrences in output_ids[: self._counted]
        self._counted = 0
        self._prompt_mask: torch.Tensor | None = None  # [V] bool: token occurs in the prompt
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # ids [B] int64, values [B] float32
        self._held: torch.Tensor | None = None  # [E] int64: ids held back by min_tokens (those < V)

    @property
    def repeats(self) -> bool:
        return self.params.repetition_penalty != 1.0

    @property
    def holds_back_ends(self) -> bool:
        return len(self.output_ids) < self.params.min_tokens and bool(self._ends)

    def _on(self, device: torch.device) -> torch.device:
        if self._device is None:
            self._device = device
        assert self._device == device, "a request's sampling state cannot move between devices"
        return device

    def output_counts(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[V] float32 on ``device``: how often each token occurs in ``output_ids`` (only new tokens are added)."""
        if self._counts is None:
            self._counts = torch.zeros(vocab, device=self._on(device))
        new = self.output_ids[self._counted :]
        if new:
            ids = torch.tensor(new, device=self._on(device))
            self._counts.index_put_((ids,), torch.ones((), device=device), accumulate=True)
            self._counted = len(self.output_ids)
        return self._counts

    def prompt_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[V] bool on ``device``: the token occurs in the prompt (ids >= V, which the model cannot emit, skipped as
        Hugging Face skips them)."""
        if self._prompt_mask is None:
            mask = torch.zeros(vocab, dtype=torch.bool, device=self._on(device))
            ids = torch.tensor(list(self.prompt_ids), dtype=torch.long, device=device)
            mask[ids[ids < vocab]] = True
            self._prompt_mask = mask
        return self._prompt_mask

    def bias(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B] int64, biases [B] float32) on ``device``; the engine has checked the ids against the vocabulary."""
        if self._bias is None:
            bias = self.params.logit_bias
            self._bias = (
                torch.tensor([t for t, _ in bias], dtype=torch.long, device=self._on(device)),
                torch.tensor([b for _, b in bias], dtype=torch.float32, device=device),
            )
        return self._bias

    def held_ids(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[E] int64 on ``device``: the end ids min_tokens holds back (one >= V cannot be sampled anyway)."""
        if self._held is None:
            self._held = torch.tensor([t for t in self._ends if t < vocab], dtype=torch.long, device=self._on(device))
        return self._held


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt: torch.Tensor | None,
    repetition: torch.Tensor,
    frequency: torch.Tensor | None,
    presence: torch.Tensor | None,
) -> torch.Tensor:
    """Row i: ``seen = prompt[i] | counts[i] > 0; l = where(seen, where(l < 0, l * rep[i], l / rep[i]), l);
    l -= freq[i] * counts[i] + pres[i] * (counts[i] > 0)``.

    logits [P, V] float32    counts [P, V] float32 (output occurrences)    prompt [P, V] bool (token in the prompt;
    None: no row has a repetition penalty)    repetition [P] float32 (1 = off)    frequency, presence [P] float32
    (0 = off; None: no row has either)
    returns [P, V] float32 (a new tensor); rows with neutral values come back bit-for-bit unchanged.
    """
    present = counts > 0  # [P, V]
    if prompt is not None:
        rep = repetition.unsqueeze(1)
        logits = torch.where(prompt | present, torch.where(logits < 0, logits * rep, logits / rep), logits)
    if frequency is not None and presence is not None:
        logits = logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * present
    return logits


def apply_logits_processors(logits: torch.Tensor, rows: Sequence[RowHistory]) -> bool:
    """In place, row i of ``logits`` gets ``rows[i]``'s penalties, bias and min_tokens mask (module docstring).

    logits [N, V] float32 (modified in place)    rows: N histories
    returns whether any row was changed (False: the logits are untouched and nothing was computed).
    """
    vocab, device = logits.shape[1], logits.device
    counted = [i for i, r in enumerate(rows) if r.counts_output]
    if counted:
        _penalise(logits, [rows[i] for i in counted], torch.tensor(counted, device=device))
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if biased:
        pairs = [rows[i].bias(device) for i in biased]
        at = _row_index(biased, [len(ids) for ids, _ in pairs], device)
        logits.index_put_((at, torch.cat([ids for ids, _ in pairs])), torch.cat([b for _, b in pairs]), accumulate=True)
    held = [i for i, r in enumerate(rows) if r.holds_back_ends]
    if held:
        ids = [rows[i].held_ids(vocab, device) for i in held]
        at = _row_index(held, [len(x) for x in ids], device)
        logits.index_put_((at, torch.cat(ids)), torch.tensor(-math.inf, device=device))
    return bool(counted or biased or held)


def _penalise(logits: torch.Tensor, rows: list[RowHistory], index: torch.Tensor) -> None:
    """logits [N, V] float32, in place at rows ``index`` [P] int64 (whose histories are ``rows``)."""
    vocab, device = logits.shape[1], logits.device
    counts = torch.stack([r.output_counts(vocab, device) for r in rows])  # [P, V]
    prompt = torch.stack([r.prompt_mask(vocab, device) for r in rows]) if any(r.repeats for r in rows) else None

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r.params, name) for r in rows], device=device, dtype=torch.float32)  # [P]

    additive = any(r.params.frequency_penalty or r.params.presence_penalty for r in rows)
    frequency, presence = (column("frequency_penalty"), column("presence_penalty")) if additive else (None, None)
    logits[index] = apply_penalties(logits[index], counts, prompt, column("repetition_penalty"), frequency, presence)


def _row_index(rows: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """[sum(lengths)] int64: rows[j] repeated lengths[j] times (the row of each flattened (row, id) pair)."""
    return torch.repeat_interleave(torch.tensor(rows, device=device), torch.tensor(lengths, device=device))
