"""Fixtures of the registry and archive tests: a fake validator and a registry in a fresh data directory."""

from pathlib import Path

import pytest

from server.adapters.registry import AdapterRegistry
from tests.helpers.registry_fakes import FakeValidator


@pytest.fixture
def validator() -> FakeValidator:
    return FakeValidator()


@pytest.fixture
def registry(tmp_path: Path, validator: FakeValidator) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "data", validator)
