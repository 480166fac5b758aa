"""Weighted mixtures against PEFT's ``add_weighted_adapter(..., combination_type="cat")``: logits of one mixed batch
(mixtures, their parts and the base model in one forward pass), greedy tokens through the engine, and the engine's
refusals, invalidation and prefix-cache namespaces."""

import pytest
import torch
from transformers import AutoTokenizer

from loadtests.common.factories import save_peft_adapter
from loadtests.common.lora_rows import lora_logits, row_mapping
from loadtests.common.peft_reference import PeftReference
from server.adapters.mixture import MixturePart, cat_adapters, mixture_key
from server.engine.engine import Engine, EngineConfig
from server.engine.errors import RequestError, UnknownAdapterError
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from server.kernels.slots import BASE_SLOT
from server.model.loader import load_base_model
from server.model.lora_model import DEFAULT_TARGETS, LoraModel
from tests.helpers.engines import make_engine, run_until_done

ATOL = 5e-5
ALL = list(DEFAULT_TARGETS)
# Parts adapting the same modules: plain, rsLoRA, rank/alpha patterns; "qv" adapts fewer modules.
PARTS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ALL},
    "rs": {"r": 8, "lora_alpha": 32, "use_rslora": True, "target_modules": ALL},
    "pattern": {  # its largest rank (12) is above r: PEFT's mixture rank counts the largest
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ALL,
        "rank_pattern": {"down_proj": 4, r"layers\.1\.self_attn\.q_proj": 12},
        "alpha_pattern": {"gate_proj": 3},
    },
    "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
}
# (parts and weights) per mixture: a rank_pattern part; an rsLoRA first part (scale sqrt(8 + 4 + 12)) and a negative
# weight; a single part with a negative weight (PEFT's "linear" path for one adapter); three parts with the rsLoRA
# one in the middle.
MIXTURES = [
    [("plain", 0.7), ("pattern", 0.3)],
    [("rs", 0.5), ("plain", -1.0), ("pattern", 0.8)],
    [("plain", -1.0)],
    [("pattern", 1.2), ("rs", -0.4), ("plain", 0.25)],
]


def key_of(mixture: list[tuple[str, float]]) -> str:
    return mixture_key([MixturePart(n, w) for n, w in mixture])


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The tiny Llama, the parts saved by PEFT, and PEFT holding the parts and every mixture ("m0", "m1", ...)."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    root = tmp_path_factory.mktemp("mixture-parts")
    folders = {name: save_peft_adapter(base, root / name, seed=300 + i, **cfg) for i, (name, cfg) in
               enumerate(PARTS.items())}  # fmt: skip
    reference = PeftReference(model_dir, list(folders.values()))
    names = dict(zip(PARTS, reference.names, strict=True))  # our part name -> PEFT's adapter name
    for i, mixture in enumerate(MIXTURES):
        reference.model.add_weighted_adapter([names[n] for n, _ in mixture], [w for _, w in mixture], f"m{i}",
                                             combination_type="cat")  # fmt: skip
        reference.names.append(f"m{i}")
    reference.model.eval()
    reference.model.generation_config.eos_token_id = None
    return model_dir, folders, reference


def peft_index(reference: PeftReference, name: str) -> int:
    return reference.names.index(name)


def test_one_batch_of_mixtures_parts_and_base_matches_peft(setup) -> None:
    model_dir, folders, reference = setup
    model = LoraModel(load_base_model(model_dir), num_slots=8, max_rank=64)
    parts = {n: model.read_adapter(folders[n]) for n in ("plain", "rs", "pattern")}
    slots = {}
    for i, mixture in enumerate(MIXTURES):
        weights = cat_adapters([(parts[n], w) for n, w in mixture])
        model.write_slot(i + 1, weights)
        slots[f"m{i}"] = i + 1
    for j, name in enumerate(("plain", "rs", "pattern")):
        model.write_slot(len(MIXTURES) + 1 + j, parts[name])
        slots[name] = len(MIXTURES) + 1 + j
    rows: list[str | None] = ["m0", None, "plain", "m1", "m2", "pattern", "m3", "rs", "m0"]
    input_ids = torch.randint(
        5, model.model.config.vocab_size, (len(rows), 10), generator=torch.Generator().manual_seed(3)
    )
    mapping = row_mapping([BASE_SLOT if r is None else slots[r] for r in rows], input_ids.shape[1])
    ours = lora_logits(model, input_ids, mapping)
    peft_names = dict(zip(PARTS, reference.names, strict=False))
    indices = [None if r is None else peft_index(reference, peft_names.get(r, r)) for r in rows]
    expected = reference.rows(input_ids, indices)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # The test can fail: each mixture differs from the base and from its first part well beyond the tolerance.
    for i, mixture in enumerate(MIXTURES):
        row = rows.index(f"m{i}")
        first = reference.rows(input_ids[row : row + 1], [peft_index(reference, peft_names[mixture[0][0]])])
        assert (expected[row] - first[0]).abs().max() > 100 * ATOL
        assert (expected[row] - expected[rows.index(None)]).abs().max() > 100 * ATOL


def peft_greedy(reference: PeftReference, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = {"max_new_tokens": n, "do_sample": False, "pad_token_id": 2, "eos_token_id": None,
              "attention_mask": torch.ones_like(ids)}  # fmt: skip
    with torch.inference_mode():
        if adapter is None:
            with reference.model.disable_adapter():
                return reference.model.generate(input_ids=ids, **kwargs)[0, len(prompt) :].tolist()
        reference.model.set_adapter(adapter)
        return reference.model.generate(input_ids=ids, **kwargs)[0, len(prompt) :].tolist()


def test_engine_greedy_equals_peft_with_mixtures_parts_and_base_in_one_step(setup) -> None:
    model_dir, folders, reference = setup
    engine = make_engine(model_dir, folders, slots=8, max_batch_size=8, max_tokens_per_step=256, cpu_slots=4)
    peft_names = dict(zip(PARTS, reference.names, strict=False))
    requests: list[tuple[str | None, str | None]] = [(key_of(m), f"m{i}") for i, m in enumerate(MIXTURES)]
    requests += [("plain", peft_names["plain"]), ("rs", peft_names["rs"]), (None, None)]
    step_slots: list[set[int]] = []
    run = engine.runner.run

    def recording_run(chunks, copies):
        step_slots.append({c.slot for c in chunks})
        return run(chunks, copies)

    engine.runner.run = recording_run  # type: ignore[method-assign]
    prompts = [[10 + 7 * i + j for j in range(5 + i)] for i in range(len(requests))]
    handles = [engine.submit(p, key, SamplingParams(max_new_tokens=8, ignore_eos=True)) for p, (key, _) in
               zip(prompts, requests, strict=True)]  # fmt: skip
    run_until_done(engine)
    for prompt, (key, peft_name), handle in zip(prompts, requests, handles, strict=True):
        result = handle.result()
        assert result.finish_reason == FinishReason.LENGTH
        assert result.token_ids == peft_greedy(reference, prompt, peft_name, 8), key
    assert max(len(s) for s in step_slots) == len(requests)  # one step ran every mixture, its parts and the base
    assert all(key_of(m) in engine.slot_cache.resident() for m in MIXTURES)


def test_refused_up_front_unknown_part_mismatched_targets_and_too_large(setup, tiny_model_dir) -> None:
    model_dir, folders, _ = setup
    # max_rank 16 and one slot: a pool of 16 rank rows ("pattern" has rank 12 in one module, 8 elsewhere; "rs" 8).
    model = LoraModel(load_base_model(model_dir), num_slots=1, max_rank=16)
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), lambda name: folders[name],
                    EngineConfig(max_seq_len=256))  # fmt: skip
    prompt = [5, 6, 7]
    with pytest.raises(UnknownAdapterError, match="'nope' in the mixture"):
        engine.submit(prompt, "mix:plain*0.5+nope*0.5")
    with pytest.raises(RequestError, match="same modules"):
        engine.submit(prompt, "mix:plain*0.5+qv*0.5")
    with pytest.raises(RequestError, match="rank 20; the adapter pool holds 16"):
        engine.submit(prompt, "mix:pattern*0.5+rs*0.5")  # 12 + 8 rows in layer 1's q_proj
    with pytest.raises(RequestError, match="more than once"):
        engine.submit(prompt, "mix:plain*0.5+plain*0.5")
    with pytest.raises(RequestError, match="not a mixture"):
        engine.submit(prompt, "mix:plain*inf")
    engine.submit(prompt, "mix:pattern*1.0+plain*-0.5")  # 16 rows fit: accepted
    engine.submit(prompt, "mix:plain*0.5+rs*0.5")  # 12 rows


def test_deleting_a_part_drops_cached_mixtures_and_prefix_namespaces_differ(setup) -> None:
    model_dir, folders, _ = setup
    engine = make_engine(model_dir, dict(folders), slots=4, cpu_slots=4)
    mix, other, unrelated = (
        key_of(MIXTURES[0]),
        key_of([("plain", 0.6), ("pattern", 0.3)]),
        key_of([("rs", 0.5), ("plain", -1.0)]),
    )
    handles = [engine.submit([5, 6, 7], key, SamplingParams(max_new_tokens=2)) for key in (mix, unrelated, "plain")]
    run_until_done(engine)
    assert all(h.result().finish_reason == FinishReason.LENGTH for h in handles)
    assert engine.slot_cache.tier(mix) == "gpu" and engine.mixtures.containing("pattern") == [mix]
    keys = engine.prefix_keys
    spaces = {keys.of(k) for k in (mix, other, "plain", "pattern", None, key_of([("pattern", 0.3), ("plain", 0.7)]))}
    assert len(spaces) == 6  # a mixture shares KV with no other mixture, part, order or the base model
    before = keys.of(mix)
    engine.forget_adapter("pattern")  # as a delete does (a re-upload would follow under the same name)
    assert engine.slot_cache.tier(mix) == "disk"
    assert engine.slot_cache.tier(unrelated) == "gpu" and engine.slot_cache.tier("plain") == "gpu"
    assert keys.of(mix) != before  # the re-uploaded part starts a fresh namespace
