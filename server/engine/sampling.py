"""The batched sampler (greedy, temperature, top-k, top-p, seeded draws); the parameters are in ``sampling_params``.

Filtering follows Hugging Face's warper order and edge cases: temperature, then ``TopKLogitsWarper`` (ties at the
k-th value are kept), then ``TopPLogitsWarper`` (keep the smallest most-probable set whose mass reaches ``top_p``,
always at least one token).
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.logprob import TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.engine.structured_output import GrammarMatcher, apply_grammar_masks


class RowSampler:
    """Sampling state of one request: its own torch.Generator seeded from `seed` (or from os.urandom when None), so a
    seeded request gives the same tokens whatever else is in the batch and whatever its position in it.

    The generator is created on the logits' device at the first draw (a CUDA draw needs a CUDA generator); the same
    seed gives different streams on CPU and CUDA, but always the same stream on one device.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int] = (),
        eos_ids: frozenset[int] = frozenset(),
        grammar: GrammarMatcher | None = None,
    ) -> None:
        """``prompt_ids`` feed the repetition penalty, ``eos_ids`` what ``min_tokens`` holds back, ``grammar`` (a
        fresh matcher of this request's structured-output grammar) what the row may generate."""
        self.params = params
        self.prompt_ids = prompt_ids
        self.eos_ids = eos_ids
        self.grammar = grammar
        self.output_ids: list[int] = []
        # Without a seed we still fix one now, so the request's whole stream comes from a single generator.
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        assert self._generator.device == device, "a request's generator cannot move between devices"
        return self._generator

    def record(self, token: int) -> bool:
        """The row's sampled ``token`` is accepted into its sequence (penalty counts, grammar state); False when the
        grammar refuses it (the request must then fail: its output would not match)."""
        self.output_ids.append(token)
        return self.grammar is None or self.grammar.accept(token)


@dataclass(frozen=True)
class SampleOutput:
    tokens: list[int]  # one per row; INVALID_TOKEN for a row without a usable distribution
    logprobs: list[TokenLogprob | None]  # per row: None unless its params ask for logprobs


def filter_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``TopPLogitsWarper(top_p[i])(TopKLogitsWarper(top_k[i])(scores[i]))`` for every row i; removed -> -inf.

    scores: [M, V] float32 (already divided by temperature)    top_k: [M] int64, 0 = off    top_p: [M] float32 in (0, 1]
    returns [M, V] float32, same device.
    """
    vocab = scores.shape[-1]
    # One stable descending sort serves both filters; stable so tie order never depends on the batch.
    sorted_desc, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # [M, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [M]
    kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))  # [M, 1]
    sorted_desc = sorted_desc.masked_fill(sorted_desc < kth, -math.inf)  # ties with the k-th value survive
    # Top-p on the ascending order, exactly as HF computes it, so float rounding at the boundary agrees.
    ascending = sorted_desc.flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # [M, V]
    remove = cumulative <= (1 - top_p).unsqueeze(1)
    remove[:, -1] = False  # the most probable token always stays
    remove_desc = remove.flip(-1) | sorted_desc.isneginf()
    return scores.masked_fill(remove_desc.scatter(1, order, remove_desc), -math.inf)


INVALID_TOKEN = -1  # sample()'s answer for a row without a usable distribution


def sample(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> SampleOutput:
    """logits [N, V] float (one row per request that needs a token this step) -> one token id per row.

    Greedy rows: argmax (all greedy rows done in one batched argmax). Other rows: logits / temperature, then top-k,
    then top-p, then one torch.multinomial draw with the row's own generator, so a seeded row's tokens do not depend
    on its neighbours. Computed in float32 whatever the input dtype; a single device->host transfer at the end.
    A row whose logits (or, sampling, probabilities) are not finite gets INVALID_TOKEN and leaves the other rows
    untouched: one broken request must not fail the step.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(samplers), "one logits row per sampler"
    if not samplers:
        return SampleOutput([], [])
    logits = logits.float()
    valid = torch.isfinite(logits).all(dim=-1)  # [N]
    apply_grammar_masks(logits, [s.grammar for s in samplers])
    tokens = logits.argmax(dim=-1)  # [N]; the answer for greedy rows, overwritten for the others
    rows = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if rows:
        device = logits.device
        params = [samplers[i].params for i in rows]
        row_index = torch.tensor(rows, device=device)  # [M]
        temperature = torch.tensor([p.temperature for p in params], device=device)  # [M]
        scores = logits[row_index] / temperature.unsqueeze(1)  # [M, V]
        if any(p.top_k > 0 or p.top_p < 1 for p in params):  # skip the sort when no row filters
            top_k = torch.tensor([min(p.top_k, logits.shape[-1]) for p in params], device=device)  # fits int64
            top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)
            scores = filter_top_k_top_p(scores, top_k, top_p)
        probs = scores.softmax(dim=-1)  # [M, V]
        ok = torch.isfinite(probs).all(dim=-1, keepdim=True)  # [M, 1]
        probs = torch.where(ok, probs, 1.0 / probs.shape[-1])  # a bad row draws from a harmless stand-in, discarded
        valid[row_index] &= ok.squeeze(1)
        draws = [torch.multinomial(probs[j], 1, generator=samplers[i].generator(device)) for j, i in enumerate(rows)]
        tokens[row_index] = torch.cat(draws)
    return SampleOutput(torch.where(valid, tokens, INVALID_TOKEN).tolist(), [None] * len(samplers))
