from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.factories import ADAPTER_CONFIGS, build_tiny_model, save_peft_adapter, save_tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> folder of a tiny random model of that family with a trained tokenizer (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Callable[[str], list[Path]]:
    """family -> folders of one PEFT adapter per ADAPTER_CONFIGS entry, for the tiny model of that family."""
    cache: dict[str, list[Path]] = {}

    def get(family: str = "llama") -> list[Path]:
        if family not in cache:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).eval()
            root = tmp_path_factory.mktemp(f"adapters-{family}")
            cache[family] = [
                save_peft_adapter(base, root / f"a{i}", seed=100 + i, **cfg) for i, cfg in enumerate(ADAPTER_CONFIGS)
            ]
        return cache[family]

    return get


__all__ = ["build_tiny_model"]
