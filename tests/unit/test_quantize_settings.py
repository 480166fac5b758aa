"""``--quantize``: the values accepted, the ones refused at startup (naming the flag), and the library config each
method turns into."""

import importlib.util

import pytest
import torch
from pydantic import ValidationError

from server.config import Settings
from server.model.quantize import quantization_config


def test_quantize_defaults_to_none_and_takes_the_flag(monkeypatch) -> None:
    monkeypatch.delenv("LORA_SERVER_QUANTIZE", raising=False)
    assert Settings().quantize == "none"
    for method in ("none", "int8", "nf4"):
        assert Settings(_cli_parse_args=["--quantize", method]).quantize == method
    monkeypatch.setenv("LORA_SERVER_QUANTIZE", "nf4")
    assert Settings().quantize == "nf4"


@pytest.mark.parametrize("bad", ["int4", "fp4", "NF4", "8bit"])
def test_unknown_methods_are_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(ValidationError, match="quantize"):
        Settings(quantize=bad)


@pytest.mark.parametrize(("method", "library"), [("nf4", "bitsandbytes"), ("int8", "torchao")])
def test_a_method_whose_library_is_missing_is_refused(method: str, library: str, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == library else real(name, *a))
    with pytest.raises(ValidationError, match=f"quantize={method} needs the {library} package"):
        Settings(quantize=method)
    assert Settings(quantize="none").quantize == "none"  # the float base needs neither


def test_quantization_configs() -> None:
    assert quantization_config("none", torch.float32) is None
    nf4 = quantization_config("nf4", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert not nf4.bnb_4bit_use_double_quant  # QLoRA inference as transformers loads it by default
    int8 = quantization_config("int8", torch.float32)
    assert type(int8.quant_type).__name__ == "Int8WeightOnlyConfig"
    with pytest.raises(ValueError, match="unsupported quantize method"):
        quantization_config("int4", torch.float32)
    with pytest.raises(ValueError, match="quantize=nf4 computes in float32, float16 or bfloat16"):
        quantization_config("nf4", torch.float64)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_merging_into_a_quantized_base_is_refused_naming_both_flags(method: str) -> None:
    with pytest.raises(ValidationError, match=f"merge_dominant needs a dense base; quantize={method}"):
        Settings(quantize=method, merge_dominant=True)
    assert Settings(quantize="none", merge_dominant=True).merge_dominant
