"""The engine's per-request controls on the tiny model: prompt log-probabilities (against PEFT), scoring without
generating, ``n`` sequences sharing one prefill, stop token ids, ``min_tokens`` and special tokens in the text."""

import math

import pytest
import torch

from loadtests.common.peft_reference import PeftReference
from server.engine.engine import Engine
from server.engine.errors import RequestError
from server.engine.handle import RequestResult
from server.engine.logprob import TokenLogprob
from server.engine.model_runner import SequenceChunk
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from server.engine.structured_output import GrammarCompiler, StructuredOutputSpec
from tests.helpers.engines import make_engine, run_until_done

EOS = 2  # the tiny tokenizer's </s>
LOGPROB_TOLERANCE = 1e-4  # float32 engine (batched, chunked) vs PEFT (one row at a time): rounding only


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_adapters):
    adapters = {f"a{i}": p for i, p in enumerate(tiny_adapters("llama"))}
    reference = PeftReference(tiny_model_dir("llama"), list(adapters.values()))
    return tiny_model_dir("llama"), adapters, reference


def _spy_chunks(engine: Engine, copies: list[tuple[int, int]] | None = None) -> list[list[SequenceChunk]]:
    """Every step's chunks (and, into ``copies``, its KV block copies) as the engine hands them to the runner."""
    seen: list[list[SequenceChunk]] = []
    run = engine.runner.run

    def spy(chunks, step_copies=()):
        seen.append(list(chunks))
        if copies is not None:
            copies.extend(step_copies)
        return run(chunks, step_copies)

    engine.runner.run = spy  # type: ignore[method-assign]
    return seen


def _results(engine: Engine, handles) -> list[RequestResult]:
    run_until_done(engine)
    return [h.result() for h in handles]


def _reference_prompt_logprobs(reference: PeftReference, prompt: list[int], adapter: str | None, k: int):
    logits = reference.logits(torch.tensor([prompt]), None if adapter is None else int(adapter[1:]))[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [L, V]
    out = []
    for j in range(1, len(prompt)):
        row = logprobs[j - 1]
        order = sorted(range(row.numel()), key=lambda t: (-row[t].item(), t))[:k]
        out.append((prompt[j], row[prompt[j]].item(), [(t, row[t].item()) for t in order]))
    return out


def _assert_close(got: TokenLogprob | None, want) -> None:
    assert got is not None
    token, logprob, top = want
    assert got.token_id == token
    assert abs(got.logprob - logprob) <= LOGPROB_TOLERANCE
    assert [t for t, _ in got.top] == [t for t, _ in top]
    assert all(abs(a - b) <= LOGPROB_TOLERANCE for (_, a), (_, b) in zip(got.top, top, strict=True))


@pytest.mark.parametrize("adapter", [None, "a0", "a2"])
def test_prompt_logprobs_equal_peft_over_chunked_prompts(setup, adapter) -> None:
    model_dir, adapters, reference = setup
    engine = make_engine(model_dir, adapters, max_tokens_per_step=24)  # a 60-token prompt takes three chunks
    seen = _spy_chunks(engine)
    prompt = [(7 * i + 3) % 300 + 5 for i in range(60)]
    scored = engine.submit(prompt, adapter, SamplingParams(max_new_tokens=0, prompt_logprobs=3))
    generated = engine.submit(prompt, adapter, SamplingParams(max_new_tokens=4, prompt_logprobs=2, ignore_eos=True))
    plain_prompt = [t + 1 for t in prompt[:30]]
    plain = engine.submit(plain_prompt, adapter, SamplingParams(max_new_tokens=4, ignore_eos=True))
    score, gen, other = _results(engine, [scored, generated, plain])

    want = _reference_prompt_logprobs(reference, prompt, adapter, 3)
    assert score.finish_reason is FinishReason.LENGTH and score.completion_tokens == 0 and score.token_ids == []
    assert score.prompt_logprobs is not None and len(score.prompt_logprobs) == len(prompt)
    assert score.prompt_logprobs[0] is None
    for got, expected in zip(score.prompt_logprobs[1:], want, strict=True):
        _assert_close(got, expected)
    assert gen.prompt_logprobs is not None and len(gen.prompt_logprobs) == len(prompt)
    for got, expected in zip(gen.prompt_logprobs[1:], want, strict=True):
        _assert_close(got, (expected[0], expected[1], expected[2][:2]))
    assert other.prompt_logprobs is None and len(gen.token_ids) == 4
    # Only the requests that asked paid for logits at every position.
    plain_chunks = [c for chunks in seen for c in chunks if list(c.token_ids) == plain_prompt[c.start : c.end]]
    assert sum(len(c.token_ids) for c in plain_chunks) >= len(plain_prompt)
    assert not any(c.all_logits for c in plain_chunks)
    asked = [c for chunks in seen for c in chunks if c.all_logits]
    assert sum(len(c.token_ids) for c in asked) == 2 * len(prompt)


def test_n_sequences_prefill_the_prompt_once_and_equal_independent_requests(setup) -> None:
    model_dir, adapters, _ = setup
    prompt = [(5 * i + 11) % 300 + 5 for i in range(40)]
    params = [SamplingParams(max_new_tokens=8, temperature=0.9, seed=1000 + i, ignore_eos=True) for i in range(3)]

    engine = make_engine(model_dir, adapters, max_tokens_per_step=64, block_size=16)
    copies: list[tuple[int, int]] = []
    seen = _spy_chunks(engine, copies)
    group = _results(engine, engine.submit_group(prompt, "a1", params))
    prompt_tokens_run = sum(len(c.token_ids) for chunks in seen for c in chunks if c.start < len(prompt))
    assert prompt_tokens_run == len(prompt) + 2  # the prompt once, then the last prompt token per forked sequence
    # Forked sequences share the parent's two full blocks and copy the partial third (positions 32..38) each.
    assert len(copies) == 2 and len({dst for _, dst in copies}) == 2

    alone_engine = make_engine(model_dir, adapters, max_tokens_per_step=64)
    alone = [_results(alone_engine, [alone_engine.submit(prompt, "a1", p)])[0] for p in params]
    assert [r.token_ids for r in group] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in group}) > 1, "different seeds should give different sequences"
    assert len({r.request_id for r in group}) == 3


def test_forked_sequences_prefill_alone_when_their_parent_is_gone(setup) -> None:
    model_dir, adapters, _ = setup
    prompt = [(3 * i + 7) % 300 + 5 for i in range(20)]
    engine = make_engine(model_dir, adapters, max_batch_size=1)  # one row: a child can only start after the parent
    params = [SamplingParams(max_new_tokens=3, ignore_eos=True)] * 2
    first, second = _results(engine, engine.submit_group(prompt, None, params))
    assert first.token_ids == second.token_ids and first.finish_reason is FinishReason.LENGTH


def test_a_stop_token_id_ends_the_request_without_its_text(setup) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    prompt = [11, 42, 97, 5, 60]
    sampled = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=3)
    free = _results(engine, [engine.submit(prompt, None, sampled)])[0]
    stop_at = next(i for i, t in enumerate(free.token_ids) if i >= 1 and t not in free.token_ids[:i])
    stop_id = free.token_ids[stop_at]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=3, stop_token_ids=(stop_id,))
    stopped = _results(engine, [engine.submit(prompt, None, params)])[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == free.token_ids[: stop_at + 1]  # the stop token is counted, as EOS is
    assert stopped.text == engine.tokenizer.decode(free.token_ids[:stop_at], skip_special_tokens=True)


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(setup) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    prompt = [11, 42, 97, 5, 60]
    free = _results(engine, [engine.submit(prompt, None, SamplingParams(max_new_tokens=6, ignore_eos=True))])[0]
    first = free.token_ids[0]
    held = SamplingParams(max_new_tokens=6, ignore_eos=True, stop_token_ids=(first,), min_tokens=3)
    out = _results(engine, [engine.submit(prompt, None, held)])[0]
    assert first not in out.token_ids[:3] and len(out.token_ids) >= 3
    text = engine.tokenizer.decode(free.token_ids[:1], skip_special_tokens=True)
    if text.strip():
        by_string = SamplingParams(max_new_tokens=6, ignore_eos=True, stop=(text,), min_tokens=4)
        out = _results(engine, [engine.submit(prompt, None, by_string)])[0]
        assert len(out.token_ids) >= 4


def test_special_tokens_appear_in_the_text_only_when_asked(setup) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    force_eos = ((EOS, 100.0),)
    kept = SamplingParams(max_new_tokens=2, ignore_eos=True, logit_bias=force_eos, skip_special_tokens=False)
    skipped = SamplingParams(max_new_tokens=2, ignore_eos=True, logit_bias=force_eos)
    a, b = _results(engine, [engine.submit([11, 42], None, kept), engine.submit([11, 42], None, skipped)])
    assert a.token_ids == [EOS, EOS] == b.token_ids
    assert a.text == "</s></s>" and b.text == ""


def test_generated_logprobs_of_greedy_rows_are_the_models(setup) -> None:
    model_dir, adapters, reference = setup
    engine = make_engine(model_dir, adapters)
    prompt = [11, 42, 97, 5, 60, 8]
    result = _results(engine, [engine.submit(prompt, "a1", SamplingParams(max_new_tokens=5, logprobs=2,
                                                                          ignore_eos=True))])[0]  # fmt: skip
    full = prompt + result.token_ids
    want = _reference_prompt_logprobs(reference, full, "a1", 2)[len(prompt) - 1 :]
    assert len(result.logprobs) == 5
    for got, expected in zip(result.logprobs, want, strict=True):
        _assert_close(got, expected)
        assert math.isclose(got.top[0][1], got.logprob, abs_tol=LOGPROB_TOLERANCE)  # greedy: the top token


@pytest.mark.parametrize("params", [SamplingParams(min_tokens=2), SamplingParams(ignore_eos=True)])
def test_structured_output_refuses_what_would_outlive_its_grammar(setup, params) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_ids)
    grammar = compiler.compile(StructuredOutputSpec("choice", ("yes", "no")))
    with pytest.raises(RequestError, match="ignore_eos or min_tokens"):
        engine.submit([11, 42], None, params, grammar=grammar)
    assert engine.queue_length() == 0
