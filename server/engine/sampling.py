"""The batched sampler (greedy, temperature, top-k, top-p, seeded draws); the parameters are in ``sampling_params``.

One step: penalties, ``logit_bias`` and ``min_tokens`` (``logits_processors``), then the grammar masks
(``structured_output``), then greedy argmax or temperature and filtering, then the draws; log-probabilities of the
distribution each token was drawn from for the rows that ask (``logprobs``).

Filtering follows Hugging Face's warper order and edge cases: temperature, then ``TopKLogitsWarper`` (ties at the
k-th value are kept), then ``TopPLogitsWarper`` (keep the smallest most-probable set whose mass reaches ``top_p``,
always at least one token).
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.logits_processors import RowHistory, apply_logits_processors
from server.engine.logprob import TokenLogprob
from server.engine.logprobs import token_logprobs, unpack
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
        self.history = RowHistory(params, prompt_ids, eos_ids)  # what the penalties and min_tokens read
        # Without a seed we still fix one now, so the request's whole stream comes from a single generator.
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        assert self._generator.device == device, "a request's generator cannot move between devices"
        return self._generator

    @property
    def output_ids(self) -> list[int]:
        return self.history.output_ids

    def record(self, token: int) -> bool:
        """The row's sampled ``token`` is accepted into its sequence (penalty counts, grammar state); False when the
        grammar refuses it (the request must then fail: its output would not match)."""
        self.history.output_ids.append(token)
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
    """logits [N, V] float (one row per request that needs a token this step; not modified) -> one token id per row,
    and the log-probabilities of the rows that ask for them.

    Penalties, bias and min_tokens, then the grammar masks; then greedy rows: argmax (one batched argmax); other rows:
    logits / temperature, then top-k, then top-p, then one torch.multinomial draw with the row's own generator, so a
    seeded row's tokens do not depend on its neighbours. Computed in float32 whatever the input dtype; a single
    device->host transfer at the end. A row whose raw logits are not finite, or that has no finite logit left after
    the masks (or, sampling, no finite probabilities), gets INVALID_TOKEN and leaves the other rows untouched: one
    broken request must not fail the step.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(samplers), "one logits row per sampler"
    if not samplers:
        return SampleOutput([], [])
    raw = logits
    logits = logits.float()
    # NaN propagates into the max and the min, +-inf shows in one of them: two cheap reductions, no [N, V] mask.
    valid = torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))  # [N]
    grammars = [s.grammar for s in samplers]
    masked = any(g is not None for g in grammars)
    if logits is raw and (masked or any(s.params.penalised for s in samplers)):
        logits = logits.clone()  # the caller's tensor stays as it was
    changed = apply_logits_processors(logits, [s.history for s in samplers])
    apply_grammar_masks(logits, grammars)
    if changed or masked:
        valid &= torch.isfinite(logits.amax(dim=-1))  # NaN or +inf propagate into the max; all -inf stays -inf
    tokens = logits.argmax(dim=-1)  # [N]; the answer for greedy rows, overwritten for the others
    rows = [i for i, s in enumerate(samplers) if not s.params.greedy]
    scores = None
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
        ok = torch.isfinite(probs.amax(dim=-1, keepdim=True))  # [M, 1]; probabilities are in [0, 1] or NaN
        probs = torch.where(ok, probs, 1.0 / probs.shape[-1])  # a bad row draws from a harmless stand-in, discarded
        valid[row_index] &= ok.squeeze(1)
        draws = [torch.multinomial(probs[j], 1, generator=samplers[i].generator(device)) for j, i in enumerate(rows)]
        tokens[row_index] = torch.cat(draws)
    chosen = torch.where(valid, tokens, INVALID_TOKEN)  # [N]
    asking = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if not asking:
        return SampleOutput(chosen.tolist(), [None] * len(samplers))
    return _with_logprobs(samplers, chosen, tokens, logits, scores, rows, asking)


def _with_logprobs(
    samplers: Sequence[RowSampler],
    chosen: torch.Tensor,
    tokens: torch.Tensor,
    logits: torch.Tensor,
    scores: torch.Tensor | None,
    sampled: list[int],
    asking: list[int],
) -> SampleOutput:
    """The step's answer with log-probabilities for the ``asking`` rows, in one device->host transfer.

    chosen [N] int64 (INVALID_TOKEN for failed rows)    tokens [N] int64 (what each row drew, in [0, V))
    logits [N, V] float32 processed    scores [M, V] float32 the ``sampled`` rows' tempered, filtered logits
    Greedy rows' log-probs are of the processed logits; sampled rows' of their scores (filtered tokens: -inf).
    """
    device = logits.device
    source = logits[torch.tensor(asking, device=device)]  # [L, V]
    position = {row: j for j, row in enumerate(sampled)}
    drawn = [(j, position[row]) for j, row in enumerate(asking) if row in position]
    if drawn:
        assert scores is not None
        at, of = (torch.tensor(x, device=device) for x in zip(*drawn, strict=True))
        source[at] = scores[of]
    ks = [samplers[i].params.logprobs or 0 for i in asking]
    k = min(max(ks), logits.shape[-1])
    # A sync costs nothing on the CPU: take the cheaper top-k there; on an accelerator keep the single transfer.
    packed = token_logprobs(torch.log_softmax(source, dim=-1), tokens[asking], k, may_sync=device.type == "cpu")
    host = torch.cat([chosen.double(), packed.flatten()]).tolist()  # the single transfer; ids < 2**53 stay exact
    n = len(samplers)
    out_tokens = [int(t) for t in host[:n]]
    width = packed.shape[1]
    rows = [host[n + j * width : n + (j + 1) * width] for j in range(len(asking))]
    ks = [min(k, logits.shape[-1]) for k in ks]
    found = unpack(rows, [out_tokens[i] for i in asking], ks)
    logprobs: list[TokenLogprob | None] = [None] * n
    for row, entry in zip(asking, found, strict=True):
        if out_tokens[row] != INVALID_TOKEN:
            logprobs[row] = entry
    return SampleOutput(out_tokens, logprobs)
