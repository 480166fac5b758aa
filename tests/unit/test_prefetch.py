"""The adapter prefetcher on its own: a bounded number of reads held, the oldest request's way past the bound, and
reads nobody waits for dropped (not started when queued, their result freed when running)."""

import gc
import threading
import time
import weakref

import pytest

from server.lora.prefetch import AdapterPrefetcher


class Weights:
    """A host copy stand-in that can be watched with a weak reference."""

    def __init__(self, name: str) -> None:
        self.name = name


class GatedDisk:
    """``read`` blocks until the gate opens, and records what was read and what it returned."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started: list[str] = []
        self.returned: list[weakref.ref[Weights]] = []

    def read(self, name: str) -> Weights:
        self.started.append(name)
        self.gate.wait(10)
        if name == "bad":
            raise OSError("unreadable")
        weights = Weights(name)
        self.returned.append(weakref.ref(weights))
        return weights


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_no_read_starts_past_the_capacity_until_one_is_taken() -> None:
    disk = GatedDisk()
    prefetcher = AdapterPrefetcher(disk.read, capacity=2)
    try:
        assert prefetcher.request("a") and prefetcher.request("b")
        assert prefetcher.request("a")  # already held: nothing new
        assert not prefetcher.request("c") and prefetcher.state("c") == "absent"
        assert len(prefetcher) == 2
        disk.gate.set()
        wait_for(lambda: prefetcher.state("b") == "ready")
        assert not prefetcher.request("c")  # finished reads still count until taken
        assert prefetcher.read("a").name == "a"
        assert prefetcher.request("c") and len(prefetcher) == 2
    finally:
        prefetcher.close()


def test_the_oldest_request_may_replace_a_finished_read_never_a_pending_one() -> None:
    disk = GatedDisk()
    prefetcher = AdapterPrefetcher(disk.read, capacity=1)
    try:
        assert prefetcher.request("a")
        assert not prefetcher.request("b", urgent=True)  # "a" is still being read: nothing to drop
        disk.gate.set()
        wait_for(lambda: prefetcher.state("a") == "ready")
        assert not prefetcher.request("b")
        assert prefetcher.request("b", urgent=True)
        assert prefetcher.state("a") == "absent" and len(prefetcher) == 1
        wait_for(lambda: prefetcher.state("b") == "ready")
        assert prefetcher.read("b").name == "b"
    finally:
        prefetcher.close()


def test_forgotten_reads_are_not_started_or_not_kept() -> None:
    disk = GatedDisk()
    prefetcher = AdapterPrefetcher(disk.read, capacity=3)
    try:
        assert prefetcher.request("running") and prefetcher.request("queued") and prefetcher.request("bad")
        wait_for(lambda: disk.started == ["running"])
        for name in ("running", "queued", "bad"):
            prefetcher.forget(name)
        assert len(prefetcher) == 0
        disk.gate.set()
        assert prefetcher.request("last")  # one FIFO worker: when this read is done, the others have run
        wait_for(lambda: prefetcher.state("last") == "ready")
        assert disk.started == ["running", "last"]  # the queued reads never touched the disk
        gc.collect()
        assert disk.returned[0]() is None  # the forgotten running read's result went with its future
        assert prefetcher.read("last").name == "last" and len(prefetcher) == 0
    finally:
        prefetcher.close()


def test_a_failed_read_counts_until_its_error_is_taken() -> None:
    disk = GatedDisk()
    disk.gate.set()
    prefetcher = AdapterPrefetcher(disk.read, capacity=1)
    try:
        assert prefetcher.request("bad")
        wait_for(lambda: prefetcher.state("bad") == "failed")
        assert not prefetcher.request("a")
        assert isinstance(prefetcher.error("bad"), OSError)
        assert prefetcher.request("a")
    finally:
        prefetcher.close()


def test_capacity_must_allow_a_read() -> None:
    with pytest.raises(ValueError, match="capacity"):
        AdapterPrefetcher(GatedDisk().read, capacity=0)
