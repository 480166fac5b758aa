"""The sampler: greedy, seeded reproducibility whatever the batch, HF-equal top-k/top-p masks, temperature."""

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from server.engine.sampling import INVALID_TOKEN, RowSampler, SampleOutput, filter_top_k_top_p, sample
from server.engine.sampling_params import MAX_STOP_LENGTH, MAX_STOP_STRINGS, SamplingParams

VOCAB = 64


def _steps(num_steps: int, rows: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, VOCAB, generator=gen) * 3 for _ in range(num_steps)]


def _hf_filter(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """scores [1, V] -> HF warpers applied in generate()'s order (temperature already applied)."""
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = (torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    samplers = [RowSampler(SamplingParams()) for _ in range(7)]
    assert sample(logits, samplers).tokens == logits.float().argmax(dim=-1).tolist()


def test_empty_batch() -> None:
    assert sample(torch.empty(0, VOCAB), []) == SampleOutput([], [])


def test_seeded_row_is_independent_of_batch() -> None:
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    neighbours = [
        SamplingParams(temperature=1.3, seed=7),
        SamplingParams(temperature=0.7),  # unseeded
        SamplingParams(),  # greedy
        SamplingParams(temperature=1.0, top_p=0.5, seed=1234),  # same seed, other params
    ]
    steps = _steps(50, 5, seed=3)
    alone = RowSampler(target)
    alone_tokens = [sample(logits[2:3], [alone]).tokens[0] for logits in steps]
    again = RowSampler(target)
    assert [sample(logits[2:3], [again]).tokens[0] for logits in steps] == alone_tokens
    # The target row sits at index 2 of every batch; its neighbours' rows and draws must not matter.
    batch = [RowSampler(p) for p in neighbours[:2]] + [RowSampler(target)] + [RowSampler(p) for p in neighbours[2:]]
    batched_tokens = [sample(logits, batch).tokens[2] for logits in steps]
    assert batched_tokens == alone_tokens
    assert len(set(alone_tokens)) > 1  # really sampling, not a constant


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("bad", [SamplingParams(temperature=1.1, seed=3), SamplingParams()], ids=["sampled", "greedy"])
def test_a_row_without_a_usable_distribution_fails_alone(poison: float, bad: SamplingParams) -> None:
    """NaN/inf logits in one row (a broken adapter) give that row INVALID_TOKEN; the others sample as if alone."""
    target = SamplingParams(temperature=0.9, seed=99)
    steps = _steps(20, 4, seed=5)
    alone_sampler = RowSampler(target)
    alone = [sample(logits[1:2], [alone_sampler]).tokens[0] for logits in steps]
    batch = [RowSampler(bad), RowSampler(target), RowSampler(SamplingParams())]
    got = []
    for logits in steps:
        logits = logits[:3].clone()
        logits[0, 3] = poison
        tokens = sample(logits, batch).tokens
        assert tokens[0] == INVALID_TOKEN and tokens[2] == int(logits[2].argmax())
        got.append(tokens[1])
    assert got == alone and len(set(alone)) > 1


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 1, 17, 31, VOCAB - 1])
def test_non_finite_anywhere_in_a_row_is_caught(poison: float, at: int) -> None:
    """Wherever the bad value sits (first, last, inside a vector lane), its row fails and only its row."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(at))
    logits[1, at] = poison
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
        tokens = sample(logits, [RowSampler(params) for _ in range(3)]).tokens
        assert tokens[1] == INVALID_TOKEN and INVALID_TOKEN not in (tokens[0], tokens[2])


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    expected = logits.argmax(dim=-1).tolist()
    for _ in range(5):
        top_k = [RowSampler(SamplingParams(temperature=1.5, top_k=1)) for _ in range(6)]
        top_p = [RowSampler(SamplingParams(temperature=1.5, top_p=1e-6)) for _ in range(6)]
        assert sample(logits, top_k).tokens == expected
        assert sample(logits, top_p).tokens == expected


@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [(0, 0.9), (5, 1.0), (10, 0.8), (1, 0.5), (0, 0.3), (VOCAB, 0.99), (VOCAB + 10, 0.6), (3, 1e-4), (40, 0.999)],
)
def test_masks_match_transformers_warpers(top_k: int, top_p: float) -> None:
    scores = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(top_k)) / 0.7
    ours = filter_top_k_top_p(scores, torch.full((16,), top_k), torch.full((16,), top_p))
    for row in range(16):
        hf = _hf_filter(scores[row : row + 1], top_k, top_p)
        assert torch.equal(ours[row].isfinite(), hf[0].isfinite())
        kept = ours[row].isfinite()
        assert torch.equal(ours[row][kept], scores[row][kept])  # kept logits are untouched


def test_masks_match_with_mixed_rows() -> None:
    scores = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(9))
    params = [(0, 1.0), (7, 1.0), (0, 0.6), (12, 0.9)]
    ours = filter_top_k_top_p(scores, torch.tensor([k for k, _ in params]), torch.tensor([p for _, p in params]))
    for row, (k, p) in enumerate(params):
        assert torch.equal(ours[row].isfinite(), _hf_filter(scores[row : row + 1], k, p)[0].isfinite())


def test_top_k_keeps_ties_at_kth_value() -> None:
    scores = torch.tensor([[3.0, 2.0, 1.0, 2.0, 2.0, 0.5]])
    ours = filter_top_k_top_p(scores, torch.tensor([2]), torch.tensor([1.0]))
    assert ours.isfinite().tolist() == [[True, True, False, True, True, False]]
    assert torch.equal(ours.isfinite(), _hf_filter(scores, 2, 1.0).isfinite())


def test_top_p_boundary_matches_transformers() -> None:
    # Cumulative masses land on (or within rounding of) top_p; the same arithmetic must give the same cut.
    scores = torch.tensor([[0.5, 0.3, 0.2, 1e-9]]).log()
    for top_p in (0.5, 0.8, 0.2, 0.7, 1.0 - 1e-7):
        ours = filter_top_k_top_p(scores, torch.tensor([0]), torch.tensor([top_p]))
        assert torch.equal(ours.isfinite(), _hf_filter(scores, 0, top_p).isfinite()), top_p


def test_sampled_tokens_stay_inside_top_k() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    allowed = set(logits[0].topk(3).indices.tolist())
    sampler = RowSampler(SamplingParams(temperature=5.0, top_k=3, seed=0))
    drawn = {sample(logits, [sampler]).tokens[0] for _ in range(200)}
    assert drawn == allowed


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_tempered_softmax(temperature: float) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    sampler = RowSampler(SamplingParams(temperature=temperature, seed=42))
    draws = 2000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[sample(logits, [sampler]).tokens[0]] += 1
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert (counts / draws - expected).abs().max() < 0.04


def test_temperature_changes_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    low, high = (RowSampler(SamplingParams(temperature=t, seed=5)) for t in (0.3, 3.0))
    low_top = sum(sample(logits, [low]).tokens[0] == 0 for _ in range(500))
    high_top = sum(sample(logits, [high]).tokens[0] == 0 for _ in range(500))
    assert low_top > 400 and high_top < 250


def test_unseeded_sampler_draws_its_own_seed() -> None:
    seeds = {RowSampler(SamplingParams(temperature=1.0)).seed for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_params_defaults_and_greedy() -> None:
    params = SamplingParams(stop=["a", "b"])  # type: ignore[arg-type]
    assert params.stop == ("a", "b") and params.greedy
    assert not SamplingParams(temperature=0.1).greedy


def test_stop_strings_at_the_caps_are_accepted() -> None:
    """The caps (OpenAI's 4 stop strings; 256 characters each, ours) are inclusive."""
    stops = tuple(str(i) + "x" * (MAX_STOP_LENGTH - 1) for i in range(MAX_STOP_STRINGS))
    assert SamplingParams(stop=stops).stop == stops
    with pytest.raises(ValueError, match="at most 4 strings"):
        SamplingParams(stop=(*stops, "y"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"stop": ("a", "")}, "stop"),
        ({"stop": ("a", "x" * (MAX_STOP_LENGTH + 1))}, "stop strings may have at most 256 characters"),
        ({"stop": "abc"}, "stop must be a sequence"),  # not three one-character stops
    ],
)
def test_params_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
