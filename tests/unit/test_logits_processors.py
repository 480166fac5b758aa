"""Penalties, logit_bias and min_tokens, batched, against a per-row Python reference (Hugging Face's
RepetitionPenaltyLogitsProcessor for the repetition penalty, vLLM/OpenAI's formula for frequency and presence)."""

import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from server.engine.logits_processors import RowHistory, apply_logits_processors, apply_penalties
from server.engine.sampling import INVALID_TOKEN, RowSampler, sample
from server.engine.sampling_params import SamplingParams

VOCAB = 64
EOS = frozenset({2, 5})


def reference_row(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row [V], the plain way: HF's repetition processor, then a loop over the output's distinct tokens."""
    row = logits.clone()
    if params.repetition_penalty != 1.0:
        ids = torch.tensor([prompt + output])
        row = RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))(ids, row.unsqueeze(0))[0]
    for token, count in Counter(output).items():
        row[token] -= params.frequency_penalty * count + params.presence_penalty
    for token, bias in params.logit_bias:
        row[token] += bias
    if len(output) < params.min_tokens:
        for token in set(params.stop_token_ids) | (set() if params.ignore_eos else EOS):
            row[token] = -math.inf
    return row


MIXED = [
    SamplingParams(),  # nothing
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),  # rewards repeats
    SamplingParams(frequency_penalty=0.6),
    SamplingParams(presence_penalty=-1.5),
    SamplingParams(logit_bias=((3, 5.0), (60, -100.0), (7, 0.25))),
    SamplingParams(min_tokens=4, stop_token_ids=(9, 11)),
    SamplingParams(min_tokens=4, stop_token_ids=(9,), ignore_eos=True),
    SamplingParams(
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=0.4,
        logit_bias=((1, 2.0),),
        min_tokens=2,
        stop_token_ids=(12,),
    ),
    SamplingParams(temperature=0.8, frequency_penalty=-2.0, presence_penalty=2.0),
]


def _histories(seed: int) -> tuple[list[RowHistory], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, VOCAB, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen).tolist()
        for _ in MIXED
    ]
    return [RowHistory(p, prompt, EOS) for p, prompt in zip(MIXED, prompts, strict=True)], prompts


def test_mixed_batch_matches_the_reference_step_by_step() -> None:
    """Each row gets its own processing (rows asking nothing stay bit-for-bit); the counts follow the output as it
    grows (several steps, repeated tokens, min_tokens released after its count)."""
    histories, prompts = _histories(0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        logits = torch.randn(len(MIXED), VOCAB, generator=gen) * 3
        ours = logits.clone()
        assert apply_logits_processors(ours, histories)
        for i, (h, prompt) in enumerate(zip(histories, prompts, strict=True)):
            expected = reference_row(logits[i], h.params, prompt, h.output_ids)
            torch.testing.assert_close(ours[i], expected, rtol=1e-6, atol=1e-6)
            if not h.params.penalised:
                assert torch.equal(ours[i], logits[i])
        for h in histories:  # a step's accepted tokens, with repeats (low ids recur)
            h.output_ids.extend(torch.randint(0, 16, (2,), generator=gen).tolist())


def test_repetition_penalty_equals_transformers_exactly() -> None:
    """Positive and negative logits, tokens repeated in prompt and output, prompt ids beyond the logits' width."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2)) * 4
    cases = [(1.5, [1, 2, 2, 40, 63], [2, 7]), (0.5, [0, 0, 5], []), (2.0, [3, VOCAB + 5], [3, 3, 3])]
    histories = []
    for penalty, prompt, output in cases:
        h = RowHistory(SamplingParams(repetition_penalty=penalty), prompt)
        h.output_ids.extend(output)
        histories.append(h)
    ours = logits.clone()
    apply_logits_processors(ours, histories)
    for i, (penalty, prompt, output) in enumerate(cases):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits[i : i + 1])[0]
        assert torch.equal(ours[i], hf)


def test_apply_penalties_neutral_rows_are_unchanged() -> None:
    logits = torch.randn(2, VOCAB)
    counts = torch.zeros(2, VOCAB)
    counts[:, 3] = 2
    prompt = torch.zeros(2, VOCAB, dtype=torch.bool)
    prompt[:, 5] = True
    out = apply_penalties(
        logits, counts, prompt, torch.tensor([1.0, 1.4]), torch.tensor([0.0, 0.3]), torch.tensor([0.0, 0.0])
    )
    assert torch.equal(out[0], logits[0])
    assert torch.equal(out[1, [3, 5]] != logits[1, [3, 5]], torch.tensor([True, True]))
    assert torch.equal(out[1, 6:], logits[1, 6:])


def test_counts_are_incremental() -> None:
    """Only the tokens added since the last step are counted again; the total equals a full recount."""
    h = RowHistory(SamplingParams(frequency_penalty=1.0))
    expected = torch.zeros(VOCAB)
    for step in range(5):
        new = [step, 3, 3]
        h.output_ids.extend(new)
        for t in new:
            expected[t] += 1
        assert torch.equal(h.output_counts(VOCAB, torch.device("cpu")), expected)
    assert torch.equal(h.output_counts(VOCAB, torch.device("cpu")), expected)  # no new token: no change


def test_min_tokens_holds_back_ends_until_reached() -> None:
    params = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=(7,), seed=0)
    sampler = RowSampler(params, [1, 2], EOS)
    logits = torch.zeros(1, VOCAB)
    logits[0, [2, 5, 7]] = 50.0  # the ends would win every draw
    for _ in range(3):
        token = sample(logits, [sampler]).tokens[0]
        assert token not in {2, 5, 7}
        sampler.record(token)
    assert sample(logits, [sampler]).tokens[0] in {2, 5, 7}


def test_min_tokens_with_ignore_eos_holds_back_only_stop_ids() -> None:
    sampler = RowSampler(SamplingParams(min_tokens=2, stop_token_ids=(7,), ignore_eos=True), [], EOS)
    logits = torch.zeros(1, VOCAB)
    logits[0, 7], logits[0, 5] = 9.0, 8.0
    assert sample(logits, [sampler]).tokens == [5]  # EOS ends nothing under ignore_eos: it is not held back


def test_bias_changes_the_greedy_choice_and_leaves_the_caller_tensor() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    low = int(logits[0].argmin())
    samplers = [RowSampler(SamplingParams(logit_bias=((low, 100.0),))), RowSampler(SamplingParams())]
    assert sample(logits, samplers).tokens == [low, int(logits[1].argmax())]
    assert torch.equal(logits, before)


def test_a_row_left_without_a_finite_logit_fails_alone() -> None:
    """min_tokens holding back every token the row has leaves it no distribution: INVALID_TOKEN, neighbours go on."""
    vocab = 4
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 9.0, 0.0]])
    every = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=tuple(range(vocab)), seed=1)
    samplers = [RowSampler(every), RowSampler(SamplingParams()), RowSampler(SamplingParams(temperature=0.5, seed=2))]
    out = sample(logits, samplers)
    assert out.tokens[0] == INVALID_TOKEN and out.tokens[1] == 0 and out.tokens[2] != INVALID_TOKEN
    greedy_every = RowSampler(SamplingParams(min_tokens=1, stop_token_ids=tuple(range(vocab))))
    assert sample(logits[:2], [greedy_every, RowSampler(SamplingParams())]).tokens == [INVALID_TOKEN, 0]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raw_logits_fail_a_penalised_row_alone(poison: float) -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4))
    logits[0, 10] = poison
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=1.0, logit_bias=((10, 1.0),))
    samplers = [RowSampler(params, [10]), RowSampler(params, [10])]
    expected = int(reference_row(logits[1], params, [10], []).argmax())
    assert sample(logits, samplers).tokens == [INVALID_TOKEN, expected]


def test_greedy_with_penalties_follows_the_reference_over_steps() -> None:
    """Greedy decoding with every penalty: each step's token is the reference's argmax on the same logits."""
    params = SamplingParams(
        repetition_penalty=1.4,
        frequency_penalty=0.7,
        presence_penalty=0.3,
        logit_bias=((4, 1.5),),
        min_tokens=3,
        stop_token_ids=(0,),
    )
    prompt = [1, 4, 4, 9]
    sampler = RowSampler(params, prompt, EOS)
    gen = torch.Generator().manual_seed(5)
    output: list[int] = []
    for _ in range(20):
        logits = torch.randn(1, VOCAB, generator=gen)
        token = sample(logits, [sampler]).tokens[0]
        assert token == int(reference_row(logits[0], params, prompt, output).argmax())
        sampler.record(token)
        output.append(token)
    assert len(set(output)) > 10  # the penalties really push away from repeats


def test_seeded_penalised_row_is_independent_of_batch() -> None:
    target = SamplingParams(
        temperature=0.9,
        top_p=0.9,
        seed=77,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        logit_bias=((3, 2.0),),
        min_tokens=4,
        stop_token_ids=(8,),
    )
    neighbours = [
        SamplingParams(temperature=1.2, seed=1, frequency_penalty=2.0),
        SamplingParams(logprobs=3),
        SamplingParams(repetition_penalty=0.8, min_tokens=2),
        SamplingParams(temperature=0.7),
    ]
    gen = torch.Generator().manual_seed(6)
    steps = [torch.randn(5, VOCAB, generator=gen) * 2 for _ in range(40)]

    def run(batch: list[RowSampler], at: int, rows: slice) -> list[int]:
        got = []
        for logits in steps:
            tokens = sample(logits[rows], batch).tokens
            for sampler, token in zip(batch, tokens, strict=True):
                sampler.record(token)
            got.append(tokens[at])
        return got

    alone = run([RowSampler(target, [3, 3, 1], EOS)], 0, slice(2, 3))
    assert run([RowSampler(target, [3, 3, 1], EOS)], 0, slice(2, 3)) == alone
    batch = [RowSampler(p, [3], EOS) for p in neighbours[:2]] + [RowSampler(target, [3, 3, 1], EOS)]
    batch += [RowSampler(p, [5], EOS) for p in neighbours[2:]]
    assert run(batch, 2, slice(0, 5)) == alone
    assert len(set(alone)) > 5 and 8 not in alone[:4]
