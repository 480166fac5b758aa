from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loadtests.common.factories import ADAPTER_CONFIGS, build_tiny_model, save_peft_adapter, save_tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "model", "e2e", "tooling")  # folders under tests/, and the markers pyproject.toml registers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its kind, the folder it lives in (``-m unit`` runs tests/unit)."""
    for item in items:
        path = Path(item.path).resolve()
        if not path.is_relative_to(TESTS):
            continue
        kind = path.relative_to(TESTS).parts[0]
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: a test file belongs in one of tests/{{{','.join(KINDS)}}}/")
        item.add_marker(kind)


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
