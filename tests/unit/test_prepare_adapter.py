"""``prepare_adapter`` and ``StaleCopies``: before a request is queued, copies of an adapter that another process
deleted or replaced are dropped, and with an object store the files are fetched, on a worker thread."""

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.adapters.registry import AdapterNotFound, AdapterRecord
from server.api.generation import prepare_adapter
from server.stale_copies import StaleCopies


def _record(name: str, uid: str) -> AdapterRecord:
    return AdapterRecord(name=name, rank=8, alpha=16, target_modules=["q_proj"], size_bytes=1, sha256="0" * 64,
                         created_at="2026-01-01T00:00:00Z", source="upload", uid=uid)  # fmt: skip


class FakeRegistry:
    def __init__(self, has_store: bool, uids: dict[str, str]) -> None:
        self.has_store = has_store
        self.uids = uids
        self.paths: list[tuple[str, bool]] = []  # (name, on the main thread)

    def get(self, name: str) -> AdapterRecord:
        if name not in self.uids:
            raise AdapterNotFound(name)
        return _record(name, self.uids[name])

    def path(self, name: str) -> Path:
        self.paths.append((name, threading.current_thread() is threading.main_thread()))
        self.get(name)
        return Path("/nowhere") / name


def _service(registry: FakeRegistry) -> tuple[Any, list[str]]:
    forgotten: list[str] = []
    return SimpleNamespace(registry=registry, stale_copies=StaleCopies(registry.get, forgotten.append)), forgotten


def test_a_store_fetches_each_part_off_the_event_loop() -> None:
    registry = FakeRegistry(True, {"a": "1", "b": "2"})
    service, _ = _service(registry)
    asyncio.run(prepare_adapter(service, "mix:a*0.7+b*0.3"))
    assert registry.paths == [("a", False), ("b", False)]


def test_without_a_store_or_an_adapter_nothing_is_fetched() -> None:
    registry = FakeRegistry(False, {"a": "1"})
    service, _ = _service(registry)
    asyncio.run(prepare_adapter(service, "a"))
    asyncio.run(prepare_adapter(service, None))
    assert registry.paths == []


def test_an_unregistered_name_is_left_to_submits_404() -> None:
    registry = FakeRegistry(True, {"b": "2"})
    service, _ = _service(registry)
    asyncio.run(prepare_adapter(service, "mix:a*0.5+b*0.5"))  # no exception: submit answers 404 naming "a"
    assert registry.paths == [("a", False)]


@pytest.mark.parametrize("has_store", [False, True])
def test_a_copy_replaced_or_deleted_elsewhere_is_dropped_before_the_next_request(has_store: bool) -> None:
    registry = FakeRegistry(has_store, {"a": "1", "b": "2"})
    service, forgotten = _service(registry)
    asyncio.run(prepare_adapter(service, "a"))
    asyncio.run(prepare_adapter(service, "a"))
    assert forgotten == []  # first sight, then unchanged: the copy is current
    registry.uids["a"] = "3"  # deleted and uploaded again by another process
    asyncio.run(prepare_adapter(service, "mix:a*0.5+b*0.5"))
    assert forgotten == ["a"]
    del registry.uids["b"]  # deleted elsewhere; the periodic sweep finds it without a request naming it
    service.stale_copies.check_all()
    assert forgotten == ["a", "b"]
    service.stale_copies.check_all()
    assert forgotten == ["a", "b"]  # forgotten once: a deleted name is no longer tracked
