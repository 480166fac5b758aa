"""The merged fast path (a dominant adapter folded into the base weights, the other rows corrected) against PEFT
unmerged: one mixed batch's logits, and the engine's greedy tokens over a run that merges and unmerges."""

import random
import threading
import time

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from loadtests.common.lora_rows import lora_logits, row_mapping
from loadtests.common.peft_reference import PeftReference
from server.adapters.checkpoint import AdapterWeights
from server.adapters.mixture import cat_adapters
from server.engine.merge_control import MergeController
from server.engine.merge_policy import MergePolicyConfig
from server.engine.sampling_params import SamplingParams
from server.kernels.native.ops import native_usable
from server.kernels.slots import BASE_SLOT
from server.metrics import EngineView, ServerMetrics
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.model.merge import correction_weights, merge_adapter, merge_refusal, unmerge_adapter
from server.model.packed_linear import PackedLinear
from tests.helpers.engines import make_engine, run_until_done
from tests.model.test_engine import peft_greedy

# float32: W + s B A is rounded once more than PEFT's unmerged x W^T + s (x A^T) B^T, and the correction cancels the
# merged delta up to rounding; measured here up to ~2e-6 on logits of magnitude ~1.
ATOL = 5e-5
NATIVE = pytest.param("native", True, marks=pytest.mark.skipif(not native_usable(), reason="no native LoRA kernel"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_adapters) -> PeftReference:
    ref = PeftReference(tiny_model_dir("llama"), tiny_adapters("llama"))
    ref.model.generation_config.eos_token_id = None
    return ref


@pytest.mark.parametrize(("op", "packed"), [("reference", False), ("grouped", True), NATIVE])
@pytest.mark.parametrize("merged_index", [2, 3])  # all-linear r16; r64 with rank and alpha patterns
def test_a_mixed_batch_on_merged_weights_matches_peft_unmerged(
    op: str, packed: bool, merged_index: int, tiny_model_dir, tiny_adapters, reference
) -> None:
    folders = tiny_adapters("llama")
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=8, max_rank=64, op=op, pack_weights=packed)
    assert any(isinstance(layer.base, PackedLinear) for layer in model.layers.values()) == packed
    weights = [model.read_adapter(folder) for folder in folders]
    g = torch.Generator().manual_seed(7)
    row_adapters: list[int | None] = [merged_index, None, 0, merged_index, 1, 4, 5, merged_index, None]
    input_ids = torch.randint(5, model.model.config.vocab_size, (len(row_adapters), 10), generator=g)
    place(model, dict(enumerate(weights, start=1)))
    unmerged_slots = [BASE_SLOT if a is None else a + 1 for a in row_adapters]
    before = lora_logits(model, input_ids, row_mapping(unmerged_slots, 10))

    merged = merge_adapter(model, weights[merged_index])
    # slot i + 1: adapter i's correction; slot 7: the base model's
    corrections = {
        i + 1: correction_weights(w, weights[merged_index]) for i, w in enumerate(weights) if i != merged_index
    }
    place(model, {**corrections, 7: correction_weights(None, weights[merged_index])})
    slots = [BASE_SLOT if a == merged_index else 7 if a is None else a + 1 for a in row_adapters]
    ours = lora_logits(model, input_ids, row_mapping(slots, 10))
    expected = reference.rows(input_ids, row_adapters)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # The test can fail: base rows without their correction get the merged adapter's output, far from the base's.
    uncorrected = lora_logits(model, input_ids[1:2], None)
    assert (uncorrected - expected[1:2]).abs().max() > 100 * ATOL
    assert merged.nbytes > 0

    unmerge_adapter(model, merged)
    place(model, dict(enumerate(weights, start=1)))
    assert torch.equal(lora_logits(model, input_ids, row_mapping(unmerged_slots, 10)), before)  # restored exactly


def test_mixture_rows_beside_a_merged_part_match_peft_cat(tiny_model_dir, tiny_adapters, reference) -> None:
    """A weighted mixture (PEFT's add_weighted_adapter "cat") is a plain LoRA adapter to the correction, even with the
    merged adapter as one of its parts."""
    folders = tiny_adapters("llama")
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=4, max_rank=64, op="reference")
    weights = [model.read_adapter(folder) for folder in folders]
    if "mix23" not in reference.names:
        reference.model.add_weighted_adapter(["adapter2", "adapter3"], [0.7, -0.3], "mix23", combination_type="cat")
        reference.names.append("mix23")
    mixture = cat_adapters([(weights[2], 0.7), (weights[3], -0.3)])
    merged = merge_adapter(model, weights[2])
    place(model, {1: correction_weights(mixture, weights[2]), 2: correction_weights(None, weights[2])})
    mix = reference.names.index("mix23")
    row_adapters: list[int | None] = [2, mix, None, mix]
    input_ids = torch.randint(5, model.model.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(3))
    ours = lora_logits(model, input_ids, row_mapping([BASE_SLOT, 1, 2, 1], 9))
    unmerge_adapter(model, merged)
    torch.testing.assert_close(ours, reference.rows(input_ids, row_adapters), atol=ATOL, rtol=0)


def place(model: LoraModel, slots: dict[int, AdapterWeights]) -> None:
    """Write each slot's adapter, their pool rows one after the other (corrections outgrow a slot's home range)."""
    offset = 0
    for slot, weights in slots.items():
        model.write_slot(slot, weights, offset)
        offset += model.rows_of(weights)


def test_engine_merges_and_unmerges_and_its_greedy_tokens_equal_peft(tiny_model_dir, tiny_adapters, reference) -> None:
    adapters = {f"a{i}": p for i, p in enumerate(tiny_adapters("llama"))}
    policy = MergePolicyConfig(merge_share=0.6, unmerge_share=0.5, patience=2)
    engine = make_engine(tiny_model_dir("llama"), adapters, slots=10, max_batch_size=6, cpu_slots=4,
                         merge_dominant=True, merge_policy=policy)  # fmt: skip
    controller = engine.merge
    assert isinstance(controller, MergeController)
    remaps: list[dict[int, int]] = []
    before_step = controller.before_step

    def recording(scheduled, waiting):  # type: ignore[no-untyped-def]
        remap, failed = before_step(scheduled, waiting)
        remaps.append(remap)
        return remap, failed

    controller.before_step = recording  # type: ignore[method-assign]
    rng = random.Random(11)

    def prompt() -> list[int]:
        return [rng.randrange(5, 380) for _ in range(rng.randint(6, 14))]

    requests: list[tuple[str | None, list[int], int]] = []
    handles = []

    def submit(batch: list[tuple[str | None, list[int], int]]) -> None:
        requests.extend(batch)
        handles.extend(engine.submit(p, a, SamplingParams(max_new_tokens=n, ignore_eos=True)) for a, p, n in batch)

    # Mostly a2 (all-linear) with a few rows on other adapters (rsLoRA, patterns, a regex target) and the base, more
    # of them once merged; then, once a2's requests are done, a wave on the others, which runs unmerged.
    submit([("a2", prompt(), 30) for _ in range(5)] + [(a, prompt(), rng.randint(4, 8)) for a in ("a0", None, "a1")])
    _step_until(engine, lambda: controller.merged == "a2")
    submit([(a, prompt(), rng.randint(4, 8)) for a in ("a3", None, "a4")])
    _step_until(engine, lambda: not any(r.adapter == "a2" for r in engine.scheduler.running))
    submit([(a, prompt(), 10) for a in ("a3", "a5", None, "a0", "a1", "a4")])
    run_until_done(engine)
    stats = controller.stats
    assert stats.merges >= 1 and stats.unmerges >= 1, stats
    merged_remaps = [r for r in remaps if r]
    assert len(merged_remaps) == stats.merged_steps >= 10, stats
    assert any(BASE_SLOT in r and len(r) >= 3 for r in merged_remaps), "no merged step served base and adapter rows"
    for (adapter, ids, n), handle in zip(requests, handles, strict=True):
        assert handle.result().token_ids == peft_greedy(reference, ids, adapter, n), adapter
    metrics = ServerMetrics()
    metrics.add_engine_view(EngineView(lambda: 0, lambda: 0, lambda: engine.cache_stats, engine.resident_counts,
                                       lambda: len(adapters), engine.memory_stats))  # fmt: skip
    scraped = {s.labels["event"]: s.value for f in text_string_to_metric_families(generate_latest(metrics.registry)
               .decode()) if f.name == "lora_dominant_merges" for s in f.samples}  # fmt: skip
    assert scraped == {"merge": stats.merges, "unmerge": stats.unmerges}
    engine.shutdown()  # unmerges whatever the tail merged (the last requests' adapter, alone)
    assert controller.merged is None and stats.held_bytes == 0


def test_merging_is_refused_for_dora_and_for_a_base_that_is_not_dense(tiny_model_dir, tiny_adapters) -> None:
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=2, max_rank=64, pack_weights=False)
    weights = model.read_adapter(tiny_adapters("llama")[0])  # q_proj and v_proj
    assert merge_refusal(model, weights) is None
    name = next(n for n in weights.layers if n.endswith("q_proj"))
    layer = model.layers[name]
    original = layer.base
    layer.base = nn.Sequential(original)  # stands for any stored form other than a dense linear
    try:
        assert "stored quantized" in (merge_refusal(model, weights) or "")
        with pytest.raises(ValueError, match="stored quantized"):
            merge_adapter(model, weights)
    finally:
        layer.base = original
    dora = type(weights)(weights.spec, {n: type(lw)(lw.a, lw.b, lw.scale, torch.ones(lw.b.shape[0]))
                                        for n, lw in weights.layers.items()})  # fmt: skip
    assert "DoRA" in (merge_refusal(model, dora) or "")
    with pytest.raises(ValueError, match="DoRA"):
        correction_weights(dora, weights)


def _step_until(engine, done, limit: int = 2000) -> None:  # type: ignore[no-untyped-def]
    for _ in range(limit):
        if done():
            return
        if engine.step() == 0:
            time.sleep(0.002)
    raise AssertionError("the engine never got there")


def test_a_row_whose_correction_is_not_read_yet_unmerges_first_and_a_delete_unmerges(
    tiny_model_dir, tiny_adapters, reference
) -> None:
    folders = {f"a{i}": p for i, p in enumerate(tiny_adapters("llama"))}
    policy = MergePolicyConfig(merge_share=0.6, unmerge_share=0.5, patience=1)
    engine = make_engine(tiny_model_dir("llama"), folders, slots=8, max_batch_size=5, merge_dominant=True,
                         merge_policy=policy)  # fmt: skip
    controller = engine.merge
    assert controller is not None
    gate = threading.Event()
    read = controller.reads.read  # the test holds back the reads of a5, as a slow disk would

    def slow_read(name: str) -> AdapterWeights:
        if name == "a5":
            gate.wait()
        return read(name)

    controller.reads.read = slow_read  # type: ignore[method-assign]
    rng = random.Random(3)
    requests = [("a2", [rng.randrange(5, 380) for _ in range(8)], 30) for _ in range(3)]
    handles = [engine.submit(p, a, SamplingParams(max_new_tokens=n, ignore_eos=True)) for a, p, n in requests]
    _step_until(engine, lambda: controller.merged == "a2")
    late = [("a5", [rng.randrange(5, 380) for _ in range(6)], 8), ("a0", [rng.randrange(5, 380) for _ in range(6)], 20)]
    handles.append(engine.submit(late[0][1], "a5", SamplingParams(max_new_tokens=8, ignore_eos=True)))
    requests.append(late[0])
    _step_until(engine, lambda: controller.merged is None)
    assert controller.stats.forced_unmerges == 1  # a5's row arrived without its correction: unmerged before it ran
    gate.set()
    _step_until(engine, lambda: controller.merged == "a2")  # merged again, a5's row corrected
    handles.append(engine.submit(late[1][1], "a0", SamplingParams(max_new_tokens=20, ignore_eos=True)))
    requests.append(late[1])
    _step_until(engine, lambda: any(r.adapter == "a0" for r in engine.scheduler.running) and
                controller.merged == "a2")  # fmt: skip
    forced = controller.stats.forced_unmerges
    engine.forget_adapter("a0")  # deleted while its row runs corrected: the next step unmerges
    engine.step()
    assert controller.merged is None and controller.stats.forced_unmerges == forced + 1
    run_until_done(engine)
    for (adapter, ids, n), handle in zip(requests, handles, strict=True):
        assert handle.result().token_ids == peft_greedy(reference, ids, adapter, n), adapter
    engine.shutdown()
