"""``--quantize nf4|int8``: our LoraModel on a quantized base against PEFT over the same base loaded by transformers
with the library's own quantization config (QLoRA's inference path), in one mixed batch of base and adapter rows.

Tolerances: the base products run the same library kernels on the same quantized weights on both sides (checked
bit for bit), so only the LoRA term and the summation order differ: 1e-5 on the logits in float32 (measured: 4e-7;
quantization itself moves them by more than 1e-3 on these tiny models, each adapter by more). bfloat16: 2e-2
(measured 6e-3 on logits of about 0.5). Greedy decoding gives the same tokens.
"""

import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

from loadtests.common.lora_rows import lora_logits, row_mapping
from server.kernels.slots import BASE_SLOT
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.model.quantize import dense_weight, is_quantized, stored_bytes

ATOL = 1e-5
ADAPTERS = (0, 2)  # rank 4 on q/v, rank 16 on all linears (tests/conftest.py ADAPTER_CONFIGS)
ROWS: Sequence[int | None] = (None, 0, 1, None, 1, 0)  # base rows between rows on each adapter
Q_PROJ = "model.layers.1.self_attn.q_proj"


def _reference_config(method: str) -> object:
    """What a PEFT user passes to ``from_pretrained`` for this format (written out here, not taken from ours)."""
    if method == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def _peft(base_dir: Path, method: str, adapters: Sequence[Path]) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's torchao layer warns that merging needs the config (not used here)
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, device_map="cpu", quantization_config=_reference_config(method)
        )
        model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
        for i, folder in enumerate(adapters[1:], start=1):
            model.load_adapter(folder, adapter_name=f"a{i}")
    return model.eval()


@torch.inference_mode()
def _peft_logits(model: PeftModel, input_ids: torch.Tensor, rows: Sequence[int | None]) -> torch.Tensor:
    """Row i alone on adapter rows[i] (None: adapters disabled) -> logits [B, L, V]."""
    out = []
    for i, adapter in enumerate(rows):
        if adapter is None:
            with model.disable_adapter():
                out.append(model(input_ids=input_ids[i : i + 1]).logits)
        else:
            model.set_adapter(f"a{adapter}")
            out.append(model(input_ids=input_ids[i : i + 1]).logits)
    return torch.cat(out)


def _ours(base_dir: Path, method: str, adapters: Sequence[Path]) -> LoraModel:
    model = LoraModel(load_base_model(base_dir, "cpu", "float32", method), num_slots=len(adapters), max_rank=64)
    for slot, folder in enumerate(adapters, start=1):
        model.write_slot(slot, model.read_adapter(folder))
    return model


def _greedy(step_logits, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step: [B, L] -> [B, L + steps]."""
    for _ in range(steps):
        next_ids = step_logits(input_ids)[:, -1].argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_ids], dim=1)
    return input_ids


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_base_with_adapters_matches_peft(method: str, tiny_model_dir, tiny_adapters) -> None:
    base_dir = tiny_model_dir("llama")
    adapters = [tiny_adapters("llama")[i] for i in ADAPTERS]
    ours = _ours(base_dir, method, adapters)
    reference = _peft(base_dir, method, adapters)

    # The same quantized weights: the base linears were quantized identically.
    our_q = ours.layers[Q_PROJ].base
    their_q = reference.get_base_model().get_submodule(Q_PROJ).base_layer
    assert is_quantized(our_q) and is_quantized(their_q)
    torch.testing.assert_close(dense_weight(our_q), dense_weight(their_q), atol=0, rtol=0)
    assert ours.packed_linears == 1  # only the float output head; the quantized linears keep their kernels
    float_base, quantized_base = load_base_model(base_dir), load_base_model(base_dir, "cpu", "float32", method)
    assert stored_bytes(quantized_base) < 0.6 * stored_bytes(float_base)  # embeddings and output head stay float

    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(5, ours.model.config.vocab_size, (len(ROWS), 10), generator=g)
    slots = [BASE_SLOT if a is None else a + 1 for a in ROWS]
    got = lora_logits(ours, input_ids, row_mapping(slots, input_ids.shape[1]))
    expected = _peft_logits(reference, input_ids, ROWS)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # The test can fail: quantization and each adapter move the logits far beyond the tolerance.
    with torch.inference_mode():
        float_logits = float_base(input_ids=input_ids[:1]).logits[0]
    assert (float_logits - expected[0]).abs().max() > 100 * ATOL
    for i, a in enumerate(ROWS):
        if a is not None:
            assert (expected[i] - expected[0]).abs().max() > 100 * ATOL, f"adapter {a} has no visible effect"

    prompt, rows = input_ids[:3, :4], ROWS[:3]  # the base and each adapter
    ours_greedy = _greedy(lambda ids: lora_logits(ours, ids, row_mapping(slots[:3], ids.shape[1])), prompt, 5)
    peft_greedy = _greedy(lambda ids: _peft_logits(reference, ids, rows), prompt, 5)
    assert torch.equal(ours_greedy, peft_greedy)


def test_nf4_in_bfloat16_keeps_the_adapter_pool_in_bfloat16(tiny_model_dir, tiny_adapters) -> None:
    """The 4-bit weight is uint8 inside; the LoRA pool takes the compute dtype, and the rows still match PEFT's
    bf16 QLoRA within a few bfloat16 roundings."""
    base_dir = tiny_model_dir("llama")
    adapter = tiny_adapters("llama")[2]
    ours = LoraModel(load_base_model(base_dir, "cpu", "bfloat16", "nf4"), num_slots=1, max_rank=16)
    ours.write_slot(1, ours.read_adapter(adapter))
    layer = ours.layers[Q_PROJ]
    assert layer.base.weight.dtype == torch.uint8 and layer.lora_a.dtype == torch.bfloat16
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, device_map="cpu",
                                                quantization_config=config)  # fmt: skip
    reference = PeftModel.from_pretrained(base, adapter, adapter_name="a0").eval()
    input_ids = torch.randint(5, ours.model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    got = lora_logits(ours, input_ids, row_mapping([1, BASE_SLOT], 8))
    expected = _peft_logits(reference, input_ids, [0, None])
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=0)  # measured 6e-3 (logits ~0.5)
    unadapted = _peft_logits(reference, input_ids[:1], [None])
    assert (expected[0] - unadapted[0]).abs().max() > 0.2  # the adapter's effect is far beyond the tolerance


def test_dense_weight_of_4bit_weights_repacked_for_the_cpu_kernel(tiny_model_dir) -> None:
    """On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight at its first forward; the dense weight read
    after that is the one before, up to the absmax rounded to bfloat16 by the repacking."""
    import bitsandbytes as bnb

    model = load_base_model(tiny_model_dir("llama"), "cpu", "float32", "nf4")
    linear = model.get_submodule(Q_PROJ)
    before = dense_weight(linear)
    weight = linear.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(dense_weight(linear), before, atol=0, rtol=2**-8)
    assert weight.quant_state.packing_format_for_cpu  # read from a copy: the module keeps its CPU layout


def test_an_already_quantized_folder_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already quantized"):
        load_base_model(folder, "cpu", "float32", "int8")


@pytest.mark.parametrize("method", ["none", "int8", "nf4"])
def test_the_benchmarks_byte_formula_is_what_the_loaded_model_holds(method: str, tiny_model_dir) -> None:
    """loadtests/bench_quantize.py extrapolates weight bytes to an 8B model with ``paper_bytes``: exact here."""
    from loadtests.bench_quantize import paper_bytes

    base_dir = tiny_model_dir("llama")
    model = load_base_model(base_dir, "cpu", "float32", method)
    buffers = sum(b.nbytes for b in model.buffers())  # rotary frequencies, not weights
    config = json.loads((base_dir / "config.json").read_text())
    assert stored_bytes(model) - buffers == paper_bytes(config, method, 4)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_dora_on_a_quantized_base_matches_peft(method: str, tiny_model_dir, tmp_path: Path) -> None:
    """DoRA's norms are taken over the dequantized base weight (``dense_weight``), as PEFT takes them over
    ``dequantize_module_weight``: a DoRA adapter and a plain one in one batch with base rows."""
    from loadtests.common.factories import save_peft_adapter

    base_dir = tiny_model_dir("llama")
    float_base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    dora = save_peft_adapter(float_base, tmp_path / "dora", seed=5, r=8, lora_alpha=16, use_dora=True,
                             target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    adapters = [dora, save_peft_adapter(float_base, tmp_path / "plain", seed=6, r=4, lora_alpha=8,
                                        target_modules=["q_proj", "up_proj"])]  # fmt: skip
    ours = _ours(base_dir, method, adapters)
    reference = _peft(base_dir, method, adapters)
    rows: list[int | None] = [0, None, 1, 0]
    input_ids = torch.randint(
        5, ours.model.config.vocab_size, (len(rows), 9), generator=torch.Generator().manual_seed(2)
    )
    slots = [BASE_SLOT if a is None else a + 1 for a in rows]
    expected = _peft_logits(reference, input_ids, rows)
    torch.testing.assert_close(lora_logits(ours, input_ids, row_mapping(slots, 9)), expected, atol=ATOL, rtol=0)


def test_the_flag_reaches_the_served_model(tiny_model_dir, tiny_adapters, tmp_path: Path) -> None:
    """``quantize=nf4`` in the settings: the service's wrapped linears are 4-bit, the pool float32, and an adapter
    is served over HTTP on top."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.config import Settings
    from server.service import Service

    startup = tmp_path / "adapters"
    shutil.copytree(tiny_adapters("llama")[2], startup / "all-linear")
    settings = Settings(base_model=tiny_model_dir("llama"), data_dir=tmp_path / "store", startup_adapters=startup,
                        quantize="nf4", device="cpu", max_seq_len=64, gpu_slots=1)  # fmt: skip
    service = Service(settings)
    layer = service.lora_model.layers[Q_PROJ]
    assert type(layer.base).__name__ == "Linear4bit" and layer.lora_a.dtype == torch.float32
    with TestClient(create_app(service)) as client:
        texts = {}
        for adapter in (None, "all-linear"):
            body = {"prompt": "the legal contract", "max_new_tokens": 6, "ignore_eos": True, "adapter": adapter}
            response = client.post("/v1/generate", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 6
            texts[adapter] = response.json()["text"]
    assert texts[None] != texts["all-linear"]
