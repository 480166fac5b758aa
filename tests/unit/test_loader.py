"""Loading the frozen base model: families, device/dtype choice, no gradients, clear errors."""

from pathlib import Path

import pytest
import torch

from server.model.loader import TESTED_MODEL_TYPES, load_base_model, resolve_device, resolve_dtype
from server.model.lora_model import LoraModel


@pytest.mark.parametrize("family", sorted(TESTED_MODEL_TYPES))
def test_loads_each_family_frozen(family: str, tiny_model_dir) -> None:
    model = load_base_model(tiny_model_dir(family))
    assert model.config.model_type == family
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    wrapped = LoraModel(model, num_slots=2, max_rank=8)
    assert len(wrapped.layers) == 7 * model.config.num_hidden_layers


def test_qwen2_biases_survive_wrapping(tiny_model_dir) -> None:
    model = load_base_model(tiny_model_dir("qwen2"))
    before = model.model.layers[0].self_attn.q_proj.bias.clone()
    wrapped = LoraModel(model, num_slots=1, max_rank=4)
    assert torch.equal(wrapped.layers["model.layers.0.self_attn.q_proj"].base.bias, before)
    assert before.abs().sum() > 0


def test_dtype_override(tiny_model_dir) -> None:
    assert load_base_model(tiny_model_dir("llama"), dtype="bfloat16").dtype == torch.bfloat16


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)  # by the CPU's flags: test_dtype_choice.py
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("mps")


def test_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        load_base_model(tmp_path)
