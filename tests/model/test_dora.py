"""DoRA adapters served unmerged, in one batch with plain LoRA adapters and base rows, against PEFT's DoRA forward."""

from pathlib import Path

import pytest
import torch

from loadtests.common.dora import save_dora_adapter, without_dora
from loadtests.common.lora_rows import lora_logits, row_mapping
from loadtests.common.peft_reference import PeftReference
from server.adapters.errors import AdapterMismatchError
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from server.kernels.mapping import TokenSlotMapping
from server.kernels.native.ops import native_usable
from server.kernels.slots import BASE_SLOT
from server.lora.slot_cache import SlotCache
from server.model.loader import load_base_model
from server.model.lora_model import DEFAULT_TARGETS, LoraModel
from tests.helpers.engines import make_engine, run_until_done
from tests.model.test_engine import peft_greedy

ATOL = 5e-5
NATIVE = pytest.param("native", marks=pytest.mark.skipif(not native_usable(), reason="no native LoRA kernel here"))
# Ranks 8, 16 (rsLoRA, all-linear) and 32 with a rank and alpha pattern (q_proj of layer 1 at 12, down_proj at 4).
DORA_CONFIGS = (
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    {
        "r": 32,
        "lora_alpha": 64,
        "target_modules": list(DEFAULT_TARGETS),
        "rank_pattern": {"down_proj": 4, r"layers\.1\.self_attn\.q_proj": 12},
        "alpha_pattern": {"gate_proj": 3},
    },
)
# Adapters of every test: the DoRA ones, then plain LoRA (ranks 4 and 8, the second rsLoRA) from tiny_adapters.
ROWS_OF = [9, 17, 33, 4, 8]
EXPECTED: dict[Path, torch.Tensor] = {}


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: biases on q/k/v, which DoRA's rescale skips
def setup(request, tiny_model_dir, tiny_adapters, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    family = request.param
    model_dir = tiny_model_dir(family)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    root = tmp_path_factory.mktemp(f"dora-{family}")
    dora = [save_dora_adapter(base, root / f"d{i}", seed=200 + i, **cfg) for i, cfg in enumerate(DORA_CONFIGS)]
    adapters = [*dora, *tiny_adapters(family)[:2]]
    bytes_per_row = LoraModel(load_base_model(model_dir), num_slots=1, max_rank=32, op="reference").bytes_per_row
    return model_dir, adapters, PeftReference(model_dir, adapters), bytes_per_row


def _inputs(vocab: int, rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(5, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _cache(model: LoraModel, adapters: list, num_slots: int) -> tuple[SlotCache, list[str]]:
    names = [f"a{i}" for i in range(len(adapters))]
    folders = dict(zip(names, adapters, strict=True))

    class Source:
        def read(self, name: str):
            return model.read_adapter(folders[name])

    return SlotCache(num_slots=num_slots, cpu_capacity=len(adapters), source=Source(), backend=model), names


@pytest.mark.parametrize("op", ["reference", "grouped", NATIVE])
def test_dora_and_lora_in_one_batch_match_peft(op: str, setup) -> None:
    """Three DoRA adapters and two plain ones packed by the slot cache into a pool of exactly their rows (each DoRA
    adapter one row past its rank), rows of all of them and of the base in one gathered batch, match PEFT."""
    model_dir, adapters, reference, bytes_per_row = setup
    budget = sum(ROWS_OF) * bytes_per_row
    model = LoraModel(load_base_model(model_dir), len(adapters), 32, op=op, adapter_cache_bytes=budget)
    cache, names = _cache(model, adapters, len(adapters))
    slots = [cache.acquire(name) for name in names]
    assert [model.rows_of(model.read_adapter(a)) for a in adapters] == ROWS_OF
    assert cache.usage().rows_used == model.pool_rows == sum(ROWS_OF)

    row_adapters: list[int | None] = [0, None, 3, 1, 2, 4, 0, None, 2, 1]
    input_ids = _inputs(model.model.config.vocab_size, len(row_adapters), 7, seed=11)
    mapping = row_mapping([BASE_SLOT if a is None else slots[a] for a in row_adapters], 7)
    assert mapping.gathered
    if model_dir not in EXPECTED:  # PEFT's logits, once per family
        EXPECTED[model_dir] = reference.rows(input_ids, row_adapters)
    torch.testing.assert_close(lora_logits(model, input_ids, mapping), EXPECTED[model_dir], atol=ATOL, rtol=0)


def test_the_magnitudes_matter(setup, tmp_path) -> None:
    """The test above can fail: PEFT's DoRA output and the same A, B served as plain LoRA differ well past ATOL."""
    model_dir, adapters, reference, _ = setup
    plain = PeftReference(model_dir, [without_dora(a, tmp_path / a.name) for a in adapters[:3]])
    input_ids = _inputs(plain.model.config.vocab_size, 1, 7, seed=12)
    for i in range(3):
        gap = (reference.logits(input_ids, i) - plain.logits(input_ids, i)).abs().max()
        assert gap > 100 * ATOL, f"DoRA adapter {i} looks like plain LoRA"


def test_dora_rows_follow_compaction_and_eviction(setup) -> None:
    """A DoRA adapter moved down by compaction, and one evicted and loaded again, still match PEFT."""
    model_dir, adapters, reference, bytes_per_row = setup
    model = LoraModel(load_base_model(model_dir), 3, 32, op="grouped", adapter_cache_bytes=45 * bytes_per_row)
    cache, names = _cache(model, adapters, num_slots=3)
    plain8, dora8, dora16, dora32 = names[4], names[0], names[1], names[2]
    for name in (plain8, dora8, dora16):  # rows 0-7, 8-16, 17-33
        cache.acquire(name)
    cache.release(plain8)
    cache.release(dora16)
    dora8_slot = cache.acquire(dora8)  # pinned twice now; released once below, still held
    cache.release(dora8)
    dora32_slot = cache.acquire(dora32)  # 33 rows: evicts the other two, compacts dora8 down to row 0
    assert cache.stats.compactions == 1 and cache.offset(dora8_slot) == 0
    assert model.dora[dora8_slot] == (0, 8) and model.dora[dora32_slot] == (9, 41)

    row_adapters: list[int | None] = [2, None, 0]
    input_ids = _inputs(model.model.config.vocab_size, 3, 6, seed=13)
    mapping = row_mapping([dora32_slot, BASE_SLOT, dora8_slot], 6)
    expected = reference.rows(input_ids, row_adapters)
    torch.testing.assert_close(lora_logits(model, input_ids, mapping), expected, atol=ATOL, rtol=0)

    # A plain adapter written over the DoRA slot leaves no rescale behind; clearing it gives the base model.
    cache.release(dora32)
    cache.release(dora8)
    model.write_slot(dora8_slot, model.read_adapter(adapters[3]), offset=0)
    assert dora8_slot not in model.dora
    expected = reference.rows(input_ids[2:], [3])
    torch.testing.assert_close(lora_logits(model, input_ids[2:], row_mapping([dora8_slot], 6)), expected, atol=ATOL,
                               rtol=0)  # fmt: skip
    model.clear_slot(dora32_slot)
    base_only = reference.rows(input_ids[:1], [None])
    torch.testing.assert_close(lora_logits(model, input_ids[:1], row_mapping([dora32_slot], 6)), base_only, atol=ATOL,
                               rtol=0)  # fmt: skip


def test_a_dora_adapter_needs_its_extra_row(setup) -> None:
    model_dir, adapters, _, _ = setup
    model = LoraModel(load_base_model(model_dir), num_slots=1, max_rank=32, op="reference")
    assert model.pool_rows == 32
    with pytest.raises(AdapterMismatchError, match="DoRA adapter of rank 32 takes 33 pool rows"):
        model.read_adapter(adapters[2])
    model.read_adapter(adapters[1])  # rank 16 + 1 fits


def test_engine_greedy_equals_peft_with_dora_and_lora(setup) -> None:
    """Staggered requests on DoRA, plain and no adapter through the engine (three slots for five adapters, so
    slots are rewritten between DoRA and plain adapters) give PEFT's greedy tokens."""
    model_dir, adapters, reference, _ = setup
    reference.model.generation_config.eos_token_id = None
    named = {f"a{i}": folder for i, folder in enumerate(adapters)}
    engine = make_engine(model_dir, named, slots=3)
    requests = [("a0", 17, 9), ("a3", 5, 12), (None, 9, 6), ("a1", 30, 10), ("a2", 3, 8), ("a4", 12, 7),
                ("a0", 2, 5), ("a2", 21, 11)]  # fmt: skip
    handles, prompts = [], []
    for i, (adapter, length, n) in enumerate(requests):
        prompts.append([(7 * i + 13 * t) % 370 + 5 for t in range(length)])
        handles.append(engine.submit(prompts[-1], adapter, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        if i % 2:
            engine.step()
    run_until_done(engine)
    for (adapter, _, n), prompt, handle in zip(requests, prompts, handles, strict=True):
        result = handle.result()
        assert result.finish_reason == FinishReason.LENGTH
        assert result.token_ids == peft_greedy(reference, prompt, adapter, n), f"adapter {adapter}"
    assert engine.slot_cache.stats.evictions > 0
    engine.shutdown()


def test_each_step_lists_its_dora_runs_once(setup) -> None:
    """Long runs become slices, many short ones one gather; steps without DoRA tokens carry nothing for DoRA."""
    model_dir, adapters, _, _ = setup
    model = LoraModel(load_base_model(model_dir), num_slots=6, max_rank=64, op="reference")
    for slot in range(1, 6):
        model.write_slot(slot, model.read_adapter(adapters[slot - 1]))  # slots 1-3 DoRA, 4-5 plain
    rows = {slot: model.dora[slot][1] for slot in (1, 2, 3)}
    assert rows == {1: 8, 2: 64 + 16, 3: 128 + 32}  # home offsets (slot - 1) * 64, the row past the rank
    assert model.prepare(row_mapping([4, 5, 0], 3)).dora is None
    step = model.prepare(TokenSlotMapping.build([1] * 20 + [4, 2, 3, 4]))
    assert step.dora.spans == ((0, 20, 8), (21, 22, 80), (22, 23, 160)) and step.dora.tokens is None
    step = model.prepare(TokenSlotMapping.build([1] * 20 + [2, 4, 3, 4, 2, 4, 3, 0, 1]))
    assert step.dora.spans == ((0, 20, 8),) and step.dora.slots == {1, 2, 3}
    assert step.dora.tokens.tolist() == [20, 22, 24, 26, 28] and step.dora.rows.tolist() == [80, 160, 80, 160, 8]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_dora_on_a_quantized_base_matches_peft(method: str, tiny_model_dir, tiny_adapters, tmp_path) -> None:
    """QLoRA-style: DoRA and plain rows over an NF4 (bitsandbytes) or int8 (torchao) base against PEFT over the same
    base loaded by transformers with the library's config, where PEFT takes DoRA's norms over the dequantized weight
    (we take ||W||^2 from it at startup and A W^T from the quantized base's own product). Measured: 8e-7."""
    from peft import PeftModel
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    model_dir = tiny_model_dir("llama")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapters = [save_dora_adapter(base, tmp_path / f"d{i}", seed=300 + i, **DORA_CONFIGS[i]) for i in (0, 1)]
    adapters.append(tiny_adapters("llama")[0])
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if method == "nf4"
        else TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    )
    peft_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu",
                                                     quantization_config=quantization)  # fmt: skip
    peft = PeftModel.from_pretrained(peft_base, adapters[0], adapter_name="a0")
    for i, folder in enumerate(adapters[1:], start=1):
        peft.load_adapter(folder, adapter_name=f"a{i}")
    peft.eval()
    model = LoraModel(load_base_model(model_dir, "cpu", "float32", method), num_slots=3, max_rank=32)
    for slot, folder in enumerate(adapters, start=1):
        model.write_slot(slot, model.read_adapter(folder))

    rows: list[int | None] = [0, None, 2, 1, 0]
    input_ids = _inputs(model.model.config.vocab_size, len(rows), 6, seed=14)
    expected = []
    with torch.inference_mode():
        for i, a in enumerate(rows):
            if a is None:
                with peft.disable_adapter():
                    expected.append(peft(input_ids=input_ids[i : i + 1]).logits)
            else:
                peft.set_adapter(f"a{a}")
                expected.append(peft(input_ids=input_ids[i : i + 1]).logits)
    mapping = row_mapping([BASE_SLOT if a is None else a + 1 for a in rows], 6)
    torch.testing.assert_close(lora_logits(model, input_ids, mapping), torch.cat(expected), atol=ATOL, rtol=0)
