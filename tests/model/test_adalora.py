"""AdaLoRA saves (pruned ranks, a module pruned to rank 0, no pruning at all) served in the LoRA layout equal PEFT's
AdaLoRA model: per-module ranks and scales, logits in a batch mixed with plain LoRA and base rows, and greedy tokens
through the engine."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loadtests.common.lora_rows import lora_logits, row_mapping
from loadtests.common.peft_reference import PeftReference
from server.engine.sampling_params import SamplingParams
from server.kernels.native.ops import native_usable
from server.kernels.slots import BASE_SLOT
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from tests.helpers.adalora_adapters import save_adalora_adapter
from tests.helpers.engines import make_engine, run_until_done

ATOL = 5e-5
NATIVE = pytest.param("native", marks=pytest.mark.skipif(not native_usable(), reason="no native LoRA kernel here"))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tiny_adapters, tmp_path_factory) -> dict[str, Path]:
    """pruned: masks incl. a rank-0 and a whole module; unpruned: no rank_pattern; alpha0: lora_alpha=0 (peft then
    scales by the kept rank); lora: a plain LoRA adapter."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    root = tmp_path_factory.mktemp("adalora")
    mlp_and_qv = ["q_proj", "v_proj", "gate_proj", "up_proj"]
    return {
        "pruned": save_adalora_adapter(base, root / "pruned", seed=1),
        "unpruned": save_adalora_adapter(
            base, root / "unpruned", seed=2, init_r=4, prune=False, target_modules=mlp_and_qv
        ),
        "alpha0": save_adalora_adapter(base, root / "alpha0", seed=3, init_r=8, lora_alpha=0),
        "lora": tiny_adapters("llama")[1],
    }


def _peft_modules(model_dir: Path, folder: Path) -> dict[str, torch.nn.Module]:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, folder)
    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in peft_model.named_modules() if hasattr(m, "lora_E") and "default" in m.r}


@pytest.mark.parametrize("kind", ["pruned", "unpruned", "alpha0"])
def test_ranks_scales_and_weights_equal_peft_after_loading(kind: str, adapters, tiny_model_dir) -> None:
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=1, max_rank=16, op="reference")
    weights = model.read_adapter(adapters[kind])
    peft_modules = _peft_modules(tiny_model_dir("llama"), adapters[kind])
    ranks = {name: m.r["default"] for name, m in peft_modules.items()}
    if kind != "unpruned":  # the test covers what it claims: a rank-0 module, a whole one, pruned ones
        init_r = json.loads((adapters[kind] / "adapter_config.json").read_text())["init_r"]
        assert 0 in ranks.values() and init_r in ranks.values() and set(ranks.values()) - {0, init_r}
    assert weights.spec.peft_type == "ADALORA"
    assert {n for n, r in ranks.items() if r} == set(weights.layers)  # rank-0 modules carry no weights
    assert weights.rank == max(ranks.values()) == weights.spec.max_rank
    for name, m in peft_modules.items():
        assert weights.spec.rank_for(name) == ranks[name]
        if not ranks[name]:
            continue
        # peft's factor, computed as its forward does: scaling / (ranknum + 1e-5), ranknum a float32 tensor
        factor = torch.tensor(1.0) * m.scaling["default"] / (m.ranknum["default"] + 1e-5)
        lw = weights.layers[name]
        assert torch.tensor(lw.scale, dtype=torch.float32) == factor, name
        torch.testing.assert_close(lw.a, (m.lora_A["default"] * m.lora_E["default"]).detach(), atol=0, rtol=0)
        torch.testing.assert_close(lw.b, m.lora_B["default"].detach(), atol=0, rtol=0)


@pytest.mark.parametrize("op", ["reference", "grouped", NATIVE])
def test_mixed_batch_with_plain_lora_and_base_rows_matches_peft(op: str, adapters, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    names = ["pruned", "unpruned", "alpha0", "lora"]
    model = LoraModel(load_base_model(model_dir), num_slots=len(names), max_rank=16, op=op)
    for slot, name in enumerate(names, start=1):
        model.write_slot(slot, model.read_adapter(adapters[name]))
    # peft cannot hold AdaLoRA and LoRA adapters in one model: one reference for each kind
    ada = PeftReference(model_dir, [adapters[n] for n in names[:3]])
    lora = PeftReference(model_dir, [adapters["lora"]])

    row_names: list[str | None] = ["pruned", None, "lora", "unpruned", "alpha0", "pruned", None, "lora"]
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(5, model.model.config.vocab_size, (len(row_names), 10), generator=g)
    mapping = row_mapping([BASE_SLOT if n is None else names.index(n) + 1 for n in row_names], 10)
    ours = lora_logits(model, input_ids, mapping)
    expected = torch.cat([
        (lora.logits(row[None], 0) if n == "lora" else ada.logits(row[None], None if n is None else names.index(n)))
        for row, n in zip(input_ids, row_names, strict=True)
    ])  # fmt: skip
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    base = ada.logits(input_ids, None)
    for i, n in enumerate(row_names):  # the test can fail: every adapter moves the logits far beyond the tolerance
        if n is not None:
            assert (expected[i] - base[i]).abs().max() > 100 * ATOL, f"{n} has no visible effect"


def _peft_greedy(model: PeftModel, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=2)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_greedy_tokens_through_the_engine_equal_peft(adapters, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    served = {"pruned": adapters["pruned"], "lora": adapters["lora"]}
    engine = make_engine(model_dir, served, slots=2)
    requests = [("pruned", list(range(20, 33)), 10), ("lora", list(range(40, 47)), 8), (None, [5, 9, 11], 6),
                ("pruned", list(range(60, 65)), 9)]  # fmt: skip
    handles = [engine.submit(p, a, SamplingParams(max_new_tokens=n, ignore_eos=True)) for a, p, n in requests]
    run_until_done(engine)
    tokens = [h.result().token_ids for h in handles]
    refs = {name: PeftReference(model_dir, [folder]).model for name, folder in served.items()}
    for got, (adapter, prompt, n) in zip(tokens, requests, strict=True):
        if adapter is None:
            with refs["lora"].disable_adapter():
                expected = _peft_greedy(refs["lora"], prompt, n)
        else:
            expected = _peft_greedy(refs[adapter], prompt, n)
        assert got == expected, adapter
    with refs["pruned"].disable_adapter():  # the AdaLoRA adapter changes the greedy answer
        assert _peft_greedy(refs["pruned"], requests[0][1], 10) != tokens[0]
