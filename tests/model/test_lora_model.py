"""One mixed batch (rows on different adapters and the base) through our wrapped model matches PEFT row by row."""

import random

import pytest
import torch

from loadtests.common.lora_rows import lora_logits, row_mapping
from loadtests.common.peft_reference import PeftReference
from server.kernels.native.ops import native_usable
from server.kernels.slots import BASE_SLOT
from server.lora.slot_cache import SlotCache
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

ATOL = 5e-5
FAMILIES = ["llama", "qwen2", "mistral", "qwen3"]
# tests/unit/test_native_ops.py fails when a compiler is present but the kernel is not usable: this skip hides nothing.
NATIVE = pytest.param("native", marks=pytest.mark.skipif(not native_usable(), reason="no native LoRA kernel here"))


def _inputs(vocab: int, rows: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (rows, length), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("op", ["reference", "grouped", NATIVE])
def test_mixed_batch_matches_peft(family: str, op: str, tiny_model_dir, tiny_adapters) -> None:
    adapters = tiny_adapters(family)
    model = LoraModel(load_base_model(tiny_model_dir(family)), num_slots=len(adapters), max_rank=64, op=op)
    for i, folder in enumerate(adapters):
        model.write_slot(i + 1, model.read_adapter(folder))
    reference = PeftReference(tiny_model_dir(family), adapters)

    # Rows on every adapter, the base in between, an adapter used by non-adjacent rows (gathered path).
    row_adapters: list[int | None] = [None, 0, 1, 2, 3, 4, 5, 2, None, 0]
    input_ids = _inputs(model.model.config.vocab_size, len(row_adapters), 12, seed=1)
    slots = [BASE_SLOT if a is None else a + 1 for a in row_adapters]
    mapping = row_mapping(slots, input_ids.shape[1])
    assert mapping.gathered
    ours = lora_logits(model, input_ids, mapping)
    expected = reference.rows(input_ids, row_adapters)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)

    # The test can fail: every adapter moves the logits well beyond the tolerance.
    base_logits = reference.rows(input_ids, [None] * len(row_adapters))
    for i, a in enumerate(row_adapters):
        if a is not None:
            assert (expected[i] - base_logits[i]).abs().max() > 100 * ATOL, f"adapter {a} has no visible effect"


@pytest.mark.parametrize("op", ["reference", "grouped", NATIVE])
def test_contiguous_rows_and_base_only(op: str, tiny_model_dir, tiny_adapters) -> None:
    adapters = tiny_adapters("llama")
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=3, max_rank=64, op=op)
    for slot, a in ((1, 3), (2, 0), (3, 5)):
        model.write_slot(slot, model.read_adapter(adapters[a]))
    reference = PeftReference(tiny_model_dir("llama"), adapters)
    input_ids = _inputs(model.model.config.vocab_size, 5, 9, seed=2)
    row_adapters: list[int | None] = [3, 3, None, 0, 5]  # each adapter's rows adjacent: no gather needed
    mapping = row_mapping([1, 1, 0, 2, 3], 9)
    assert not mapping.gathered
    torch.testing.assert_close(
        lora_logits(model, input_ids, mapping), reference.rows(input_ids, row_adapters), atol=ATOL, rtol=0
    )
    # No mapping at all, or an all-base mapping: exactly the plain model.
    plain = reference.rows(input_ids, [None] * 5)
    torch.testing.assert_close(lora_logits(model, input_ids, None), plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(lora_logits(model, input_ids, row_mapping([0] * 5, 9)), plain, atol=ATOL, rtol=0)


def _cache(model: LoraModel, adapters: list, num_slots: int, cpu_capacity: int = 3) -> tuple[SlotCache, list[str]]:
    """A slot cache over ``model`` reading the adapter folders, named a0, a1, ..."""
    names = [f"a{i}" for i in range(len(adapters))]
    folders = dict(zip(names, adapters, strict=True))

    class Source:
        def read(self, name: str):
            return model.read_adapter(folders[name])

    return SlotCache(num_slots=num_slots, cpu_capacity=cpu_capacity, source=Source(), backend=model), names


@pytest.mark.parametrize("op", ["reference", "grouped", NATIVE])
def test_adapters_at_their_true_rank_in_one_batch_match_peft(op: str, tiny_model_dir, tiny_adapters) -> None:
    """Ranks 4, 8, 16, 64 (with rank patterns), 12 and 32 mixed in one batch, packed at their true rank by the slot
    cache into a pool of exactly their 136 rows (the stacked layout needed 6 x 64 = 384), match PEFT row by row."""
    adapters = tiny_adapters("llama")
    probe = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=1, max_rank=64, op=op)
    budget = 136 * probe.bytes_per_row + probe.bytes_per_row - 1  # a partial row is not a row
    model = LoraModel(load_base_model(tiny_model_dir("llama")), 6, 64, op=op, adapter_cache_bytes=budget)
    assert model.pool_rows == 136 and model.pool_bytes == 136 * model.bytes_per_row
    cache, names = _cache(model, adapters, num_slots=6)
    slots = [cache.acquire(name) for name in names]
    assert [model.rows_of(model.read_adapter(a)) for a in adapters] == [4, 8, 16, 64, 12, 32]
    assert cache.usage().rows_used == 136 and cache.usage().resident == 6
    reference = PeftReference(tiny_model_dir("llama"), adapters)
    row_adapters: list[int | None] = [3, None, 0, 5, 1, 2, 4, 3, 0]  # rank 64 and 4 rows far apart: gathered
    input_ids = _inputs(model.model.config.vocab_size, len(row_adapters), 7, seed=5)
    mapping = row_mapping([BASE_SLOT if a is None else slots[a] for a in row_adapters], 7)
    torch.testing.assert_close(
        lora_logits(model, input_ids, mapping), reference.rows(input_ids, row_adapters), atol=ATOL, rtol=0
    )


def test_adapter_budget_sizes_the_pool(tiny_model_dir) -> None:
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=3, max_rank=16, op="reference")
    widths = sum(layer.in_features + layer.out_features for layer in model.layers.values())
    assert model.bytes_per_row == 4 * widths and model.pool_rows == 48  # default: num_slots * max_rank
    assert all(layer.lora_a.shape[0] == 49 for layer in model.layers.values())  # + the zero row
    with pytest.raises(ValueError, match="largest rank"):
        LoraModel(load_base_model(tiny_model_dir("llama")), 3, 16, adapter_cache_bytes=16 * model.bytes_per_row - 1)


@pytest.mark.parametrize("op", ["reference", "grouped", NATIVE])
def test_many_loads_and_evictions_leave_no_stale_weights(op: str, tiny_model_dir, tiny_adapters) -> None:
    """Adapters of ranks 4..64 churn through a pool of 100 rows (one rank-64 adapter and a little more) and 3 slots:
    evictions by rows, compactions that move adapters in use; every step's mixed batch still matches PEFT."""
    adapters = tiny_adapters("llama")
    probe = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=1, max_rank=64, op=op)
    budget = 100 * probe.bytes_per_row
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=3, max_rank=64, op=op,
                      adapter_cache_bytes=budget)  # fmt: skip
    cache, names = _cache(model, adapters, num_slots=3)
    reference = PeftReference(tiny_model_dir("llama"), adapters)
    input_ids = _inputs(model.model.config.vocab_size, 3, 8, seed=3)
    expected = {a: reference.logits(input_ids, a) for a in [None, *range(len(adapters))]}

    rng = random.Random(0)
    for _ in range(30):
        chosen = rng.sample(range(len(adapters)), 2)
        slots = [cache.acquire(names[a]) for a in chosen]
        if len(set(chosen) & {3}) == 0 and rng.random() < 0.5:  # a third adapter, fitting when none is rank 64
            chosen.append(rng.choice([a for a in (0, 1, 2, 4) if a not in chosen]))
            slots.append(cache.acquire(names[chosen[2]]))
        rows: list[int | None] = [chosen[0], None, chosen[1]]
        mapping = row_mapping([slots[0], BASE_SLOT, slots[1]], 8)
        ours = lora_logits(model, input_ids, mapping)
        for i, a in enumerate(rows):
            torch.testing.assert_close(ours[i], expected[a][i], atol=ATOL, rtol=0)
        for a in chosen:
            cache.release(names[a])
    assert cache.stats.evictions > 10 and cache.stats.compactions > 0
    assert cache.stats.cpu_hits > 0 and cache.stats.loads > len(adapters)


def test_cleared_slot_is_the_base_model(tiny_model_dir, tiny_adapters) -> None:
    adapters = tiny_adapters("llama")
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=1, max_rank=64, op="reference")
    model.write_slot(1, model.read_adapter(adapters[3]))
    model.clear_slot(1)
    input_ids = _inputs(model.model.config.vocab_size, 2, 6, seed=4)
    mapping = row_mapping([1, 1], 6)
    plain = lora_logits(model, input_ids, None)
    torch.testing.assert_close(lora_logits(model, input_ids, mapping), plain, atol=0, rtol=0)
