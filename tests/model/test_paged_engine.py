"""The engine on the paged KV cache: preemption when the pool runs dry, and prefix caching, against PEFT and against
the same engine without the cache."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loadtests.common.factories import save_peft_adapter
from loadtests.common.peft_reference import PeftReference
from server.engine.engine import Engine
from server.engine.handle import RequestResult
from server.engine.kv_cache import PagedKVCache
from server.engine.sampling_params import SamplingParams
from tests.helpers.engines import make_engine, run_until_done
from tests.model.test_engine import peft_greedy


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_adapters, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    adapters = {f"a{i}": p for i, p in enumerate(tiny_adapters("llama"))}
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # An adapter on the last layer's q/o only: it changes the output but no layer's K/V (see kv_sharing).
    adapters["last"] = save_peft_adapter(base, tmp_path_factory.mktemp("last") / "last", seed=5, r=4, lora_alpha=8,
                                         target_modules=["q_proj", "o_proj"], layers_to_transform=[2])  # fmt: skip
    reference = PeftReference(model_dir, [adapters[f"a{i}"] for i in range(len(adapters) - 1)])
    reference.model.generation_config.eos_token_id = None
    return model_dir, adapters, reference


def results(engine: Engine, requests: list[tuple[str | None, list[int], SamplingParams]]) -> list[RequestResult]:
    handles = [engine.submit(prompt, adapter, params) for adapter, prompt, params in requests]
    run_until_done(engine)
    return [h.result() for h in handles]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def small_pool_engine(model_dir: Path, adapters: dict[str, Path], blocks: int, **config) -> Engine:
    nbytes = blocks * PagedKVCache.block_bytes(AutoConfig.from_pretrained(model_dir), 8, torch.float32)
    return make_engine(model_dir, adapters, max_seq_len=64, block_size=8, kv_cache_bytes=nbytes, **config)


def test_greedy_equals_peft_when_the_pool_runs_dry_and_requests_are_preempted(setup) -> None:
    model_dir, adapters, reference = setup
    engine = small_pool_engine(model_dir, adapters, blocks=10, max_batch_size=4)
    rng = random.Random(3)
    requests = [(rng.choice([None, "a0", "a1", "a2"]), [rng.randrange(5, 380) for _ in range(rng.randint(10, 20))],
                 rng.randint(25, 40)) for _ in range(6)]  # fmt: skip
    out = results(engine, [(a, p, greedy(n)) for a, p, n in requests])
    assert engine.preemptions > 0, "the test must force preemption: four rows need more than ten blocks"
    for (adapter, prompt, n), result in zip(requests, out, strict=True):
        assert result.token_ids == peft_greedy(reference, prompt, adapter, n), f"adapter {adapter}"
    stats = engine.memory_stats()
    assert stats.kv_blocks_used == 0 and stats.preemptions == engine.preemptions


def test_seeded_sampling_and_prompt_logprobs_survive_preemption(setup) -> None:
    model_dir, adapters, _ = setup
    rng = random.Random(4)
    prompts = [[rng.randrange(5, 380) for _ in range(rng.randint(12, 20))] for _ in range(5)]
    params = [SamplingParams(max_new_tokens=36, ignore_eos=True, temperature=0.9, seed=i, logprobs=2,
                             prompt_logprobs=3) for i in range(5)]  # fmt: skip
    requests = [("a1" if i % 2 else None, p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    roomy = results(make_engine(model_dir, adapters, max_seq_len=64, block_size=8, max_batch_size=5), requests)
    tight_engine = small_pool_engine(model_dir, adapters, blocks=12, max_batch_size=5)
    tight = results(tight_engine, requests)
    assert tight_engine.preemptions > 0
    for a, b, prompt in zip(roomy, tight, prompts, strict=True):
        assert a.token_ids == b.token_ids
        assert len(b.prompt_logprobs) == len(prompt)  # each prompt token reported once, never again on resume
        assert [lp and lp.token_id for lp in a.prompt_logprobs] == [lp and lp.token_id for lp in b.prompt_logprobs]
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert x is not None and y is not None and abs(x.logprob - y.logprob) < 1e-4


def test_prefix_cache_hits_give_the_tokens_of_a_miss_and_stay_within_their_adapter(setup) -> None:
    model_dir, adapters, reference = setup
    engine = make_engine(model_dir, adapters, max_seq_len=96, block_size=8)
    rng = random.Random(5)
    shared = [rng.randrange(5, 380) for _ in range(33)]
    first = shared + [11, 12, 13]
    second = shared + [21, 22]

    def run(adapter: str | None, prompt: list[int]) -> tuple[list[int], int]:
        before = engine.blocks.hit_tokens
        [res] = results(engine, [(adapter, prompt, greedy(6))])
        return res.token_ids, engine.blocks.hit_tokens - before

    assert run("a0", first)[1] == 0
    tokens, hit = run("a0", second)
    assert hit == 32  # four full blocks of the shared prefix (the 33rd token's block is not full)
    assert tokens == peft_greedy(reference, second, "a0", 6)
    assert run("a1", second)[1] == 0  # another adapter: its K/V differ
    assert run(None, second)[1] == 0  # nor the base model
    tokens, hit = run(None, first)
    assert hit == 32 and tokens == peft_greedy(reference, first, None, 6)
    tokens, hit = run("last", second)  # an adapter that changes no layer's K/V reuses the base model's blocks
    assert hit == 32
    off = make_engine(model_dir, adapters, max_seq_len=96, block_size=8, prefix_caching=False)
    [miss] = results(off, [("last", second, greedy(6))])
    assert tokens == miss.token_ids and off.blocks.hit_tokens == 0
    same, hit = run("a0", first)  # the whole prompt cached: at least its last token still runs, for logits
    assert 0 < len(first) - hit and same == peft_greedy(reference, first, "a0", 6)


def test_a_reuploaded_adapter_does_not_reuse_the_deleted_ones_blocks(setup, tmp_path) -> None:
    model_dir, adapters, _ = setup
    folders = dict(adapters)
    engine = make_engine(model_dir, folders, max_seq_len=96, block_size=8)
    prompt = list(range(5, 45))
    results(engine, [("a0", prompt, greedy(2))])
    engine.forget_adapter("a0")
    folders["a0"] = adapters["a1"]  # a new upload under the same name, with other weights
    before = engine.blocks.hit_tokens
    [res] = results(engine, [("a0", prompt, greedy(4))])
    assert engine.blocks.hit_tokens == before
    off = make_engine(model_dir, folders, max_seq_len=96, block_size=8, prefix_caching=False)
    assert res.token_ids == results(off, [("a0", prompt, greedy(4))])[0].token_ids


def test_a_pool_smaller_than_one_sequence_is_refused_at_startup(setup) -> None:
    model_dir, adapters, _ = setup
    with pytest.raises(ValueError, match="kv-cache-bytes"):
        make_engine(model_dir, adapters, max_seq_len=64, block_size=8, kv_cache_bytes=1000)


def test_logits_do_not_depend_on_where_blocks_sit(setup) -> None:
    """Fragment the pool with other requests first; the same request's tokens stay those of a fresh engine."""
    model_dir, adapters, _ = setup
    prompt = list(range(7, 40))
    fresh = results(make_engine(model_dir, adapters, max_seq_len=96, block_size=8), [("a2", prompt, greedy(8))])
    engine = make_engine(model_dir, adapters, max_seq_len=96, block_size=8, prefix_caching=False)
    results(engine, [(None, list(range(50, 50 + n)), greedy(n)) for n in (5, 17, 9)])
    assert results(engine, [("a2", prompt, greedy(8))])[0].token_ids == fresh[0].token_ids
