"""Log-probabilities: generated tokens' (of the distribution they were drawn from) and prompt tokens' (raw), against
torch.log_softmax on a single row and Hugging Face's warpers for the filtered distributions."""

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from server.engine import logprobs as logprobs_module
from server.engine import sampling
from server.engine.logprob import TokenLogprob
from server.engine.logprobs import prompt_logprobs, top_ids
from server.engine.sampling import INVALID_TOKEN, RowSampler, sample
from server.engine.sampling_params import SamplingParams

VOCAB = 64


def reference_top(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k best (id, logprob) of one row, by a plain sort: most probable first, ties by lower id."""
    pairs = sorted(enumerate(row.tolist()), key=lambda p: (-p[1], p[0]))
    return pairs[:k]


def reference_entry(row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """row [V]: the distribution's log-probs computed on this row alone."""
    logprobs = torch.log_softmax(row.unsqueeze(0), dim=-1)[0]
    return TokenLogprob(token, float(logprobs[token]), tuple(reference_top(logprobs, k)))


def assert_entry_close(got: TokenLogprob | None, expected: TokenLogprob) -> None:
    assert got is not None and got.token_id == expected.token_id
    assert [t for t, _ in got.top] == [t for t, _ in expected.top]
    assert got.logprob == pytest.approx(expected.logprob, rel=1e-5, abs=1e-5)
    for (_, ours), (_, theirs) in zip(got.top, expected.top, strict=True):
        assert ours == theirs or ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)  # -inf == -inf


@pytest.mark.parametrize("may_sync", [False, True])
def test_top_ids_orders_ties_by_lower_id(may_sync: bool) -> None:
    row = torch.tensor([[0.0, -1.0, -0.0, -1.0, -math.inf, 3.0, -math.inf, -1e-40, 1e-40, -1.0]])
    assert top_ids(row, 10, may_sync).tolist() == [[5, 8, 0, 2, 7, 1, 3, 9, 4, 6]]
    assert top_ids(row, 3, may_sync).tolist() == [[5, 8, 0]]  # 0.0 and -0.0 tie just past the end
    assert top_ids(row, 0, may_sync).shape == (1, 0)
    many = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # plenty of ties
    distinct = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1))  # almost surely none
    plateau = distinct.clone()
    plateau[2, 100:200] = 9.0  # 100 ties at the top: more than the candidates a plain topk gives
    plateau[5] = -math.inf  # all tied
    plateau[6, 500:] = -math.inf
    plateau[6, 10:] = (plateau[6, 10:] - 50).clamp(min=-50)  # the 10 first are best, then a plateau at -50
    for rows in (many, distinct, torch.cat([distinct[:3], many[3:5], distinct[5:]]), plateau):
        got = top_ids(rows, 20, may_sync)
        for i in range(8):
            assert got[i].tolist() == [t for t, _ in reference_top(rows[i], 20)]


def test_greedy_and_sampled_rows_against_single_row_references() -> None:
    """Greedy: log_softmax of the processed logits; sampled: of logits / T after HF's top-k and top-p (filtered: -inf,
    still listed when k exceeds what survives); rows not asking get None; exactly k alternatives."""
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    params = [
        SamplingParams(logprobs=5),
        SamplingParams(temperature=0.7, top_k=3, seed=1, logprobs=6),  # 3 survive: 3 -inf alternatives by lowest id
        SamplingParams(temperature=1.3, seed=2),  # not asking
        SamplingParams(temperature=0.9, top_p=0.8, seed=3, logprobs=0),
        SamplingParams(temperature=1.0, seed=4, logprobs=20),
        SamplingParams(),  # not asking
    ]
    out = sample(logits, [RowSampler(p) for p in params])
    assert out.logprobs[2] is None and out.logprobs[5] is None
    for i, p in enumerate(params):
        if p.logprobs is None:
            continue
        row = logits[i : i + 1]
        if not p.greedy:
            row = row / p.temperature
            if p.top_k:
                row = TopKLogitsWarper(p.top_k)(None, row)
            if p.top_p < 1:
                row = TopPLogitsWarper(p.top_p)(None, row)
        expected = reference_entry(row[0], out.tokens[i], p.logprobs)
        assert_entry_close(out.logprobs[i], expected)
        assert len(expected.top) == p.logprobs and math.isfinite(expected.logprob)
    entry = out.logprobs[1]
    assert entry is not None and [lp for _, lp in entry.top][3:] == [-math.inf] * 3
    assert out.tokens[0] == int(logits[0].argmax())


def test_logprobs_follow_penalties_and_min_tokens() -> None:
    """The distribution reported is the one sampled from: after penalties, bias and the min_tokens mask."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(
        repetition_penalty=1.5,
        frequency_penalty=1.0,
        logit_bias=((9, 3.0),),
        min_tokens=1,
        stop_token_ids=(4,),
        logprobs=4,
    )
    sampler = RowSampler(params, [1, 2, 9], frozenset({0}))
    sampler.record(2)
    sampler.record(2)  # two tokens out: min_tokens (1) no longer holds anything back
    out = sample(logits, [sampler, RowSampler(SamplingParams(logprobs=2))])
    processed = logits[0].clone()
    for token in (1, 2, 9):
        processed[token] = processed[token] * 1.5 if processed[token] < 0 else processed[token] / 1.5
    processed[2] -= 2.0
    processed[9] += 3.0
    assert_entry_close(out.logprobs[0], reference_entry(processed, out.tokens[0], 4))
    assert_entry_close(out.logprobs[1], reference_entry(logits[1], out.tokens[1], 2))
    held = RowSampler(SamplingParams(min_tokens=1, stop_token_ids=(4,), logprobs=20), [], frozenset({0}))
    masked = logits[0].clone()
    masked[[0, 4]] = -math.inf
    out = sample(logits[:1], [held])
    assert_entry_close(out.logprobs[0], reference_entry(masked, out.tokens[0], 20))


def test_min_tokens_masked_ids_have_minus_inf_logprobs() -> None:
    logits = torch.zeros(1, 8)
    out = sample(logits, [RowSampler(SamplingParams(min_tokens=1, stop_token_ids=(0, 1), logprobs=8))])
    entry = out.logprobs[0]
    assert entry is not None and out.tokens == [2]
    assert entry.top[:6] == tuple((t, pytest.approx(-math.log(6))) for t in range(2, 8))
    assert entry.top[6:] == ((0, -math.inf), (1, -math.inf))


def test_failed_rows_get_no_logprobs() -> None:
    logits = torch.randn(2, VOCAB)
    logits[0, 0] = math.nan
    out = sample(logits, [RowSampler(SamplingParams(logprobs=3)), RowSampler(SamplingParams(logprobs=3))])
    assert out.tokens[0] == INVALID_TOKEN and out.logprobs[0] is None and out.logprobs[1] is not None


def test_rows_not_asking_pay_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    real = sampling.token_logprobs

    def spy(logprobs: torch.Tensor, tokens: torch.Tensor, k: int, may_sync: bool = False) -> torch.Tensor:
        seen.append(tuple(logprobs.shape))
        return real(logprobs, tokens, k, may_sync)

    monkeypatch.setattr(sampling, "token_logprobs", spy)
    logits = torch.randn(5, VOCAB)
    sample(logits, [RowSampler(SamplingParams(temperature=1.0)) for _ in range(5)])
    assert seen == []
    samplers = [RowSampler(SamplingParams(logprobs=2 if i in (1, 3) else None)) for i in range(5)]
    sample(logits, samplers)
    assert seen == [(2, VOCAB)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_logprobs_slices_equal_the_whole(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Sliced computation (slices of 7 rows, the last one short) equals one pass over every row, and each entry equals
    log_softmax of its own row; rows beyond the targets are unused."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(40, VOCAB, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, VOCAB, (37,), generator=gen).tolist()
    monkeypatch.setattr(logprobs_module, "PROMPT_SLICE_ROWS", 1000)
    whole = prompt_logprobs(logits, targets, 5)
    monkeypatch.setattr(logprobs_module, "PROMPT_SLICE_ROWS", 7)
    assert prompt_logprobs(logits, targets, 5) == whole
    assert len(whole) == 37
    for j, entry in enumerate(whole):
        assert_entry_close(entry, reference_entry(logits[j].float(), targets[j], 5))
    assert [e.top for e in prompt_logprobs(logits, targets, 0)] == [()] * 37
    tied = (logits.float() * 2).round() / 2  # many equal logits: ties inside and at the end of the top lists
    for j, entry in enumerate(prompt_logprobs(tied, targets, 20)):
        assert_entry_close(entry, reference_entry(tied[j], targets[j], 20))
    assert prompt_logprobs(logits, [], 3) == []
