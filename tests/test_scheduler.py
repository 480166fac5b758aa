"""Scheduler admission order on fake slots: adapter affinity, its window, and the starvation bound."""

from collections import Counter

import pytest

from server.engine import scheduler as scheduler_module
from server.engine.request import FinishReason, Sequence
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler


class FakeSlots:
    """Every adapter is resident; ``acquire`` pins and hands out one slot per adapter name."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.pins: Counter[str] = Counter()

    def tier(self, name: str) -> str:
        return "gpu"

    def acquire(self, name: str) -> int:
        self.pins[name] += 1
        return self.slot_of.setdefault(name, len(self.slot_of) + 1)

    def release(self, name: str, slot: int | None = None) -> None:
        self.pins[name] -= 1


class ReadyPrefetcher:
    def state(self, name: str) -> str:
        return "ready"


def make(rows: int, affinity: bool = True, starvation_steps: int = 32) -> Scheduler:
    return Scheduler(rows, 64, FakeSlots(), ReadyPrefetcher(), starvation_steps, adapter_affinity=affinity)  # type: ignore[arg-type]


def seq(name: str) -> Sequence:
    """A request called ``name`` whose adapter is its first letter ("b2" -> "b"; "-" is the base model)."""
    adapter = None if name[0] == "-" else name[0]
    return Sequence(name, adapter, [1, 2, 3], SamplingParams(max_new_tokens=4), arrival=0.0)


def admitted(scheduler: Scheduler) -> list[str]:
    """Schedule a step, run it (advance every scheduled sequence) and name the sequences it admitted, in order."""
    before = set(map(id, scheduler.running))
    plan = scheduler.schedule()
    for item in plan.scheduled:
        item.seq.num_computed += item.num_tokens
    return [s.seq.request_id for s in plan.scheduled if id(s.seq) not in before]


def finish(scheduler: Scheduler, *names: str) -> None:
    for running in list(scheduler.running):
        if running.request_id in names:
            scheduler.finish(running, FinishReason.LENGTH)


def test_requests_on_running_adapters_and_the_base_go_first() -> None:
    scheduler = make(rows=3)
    scheduler.add(seq("a0"))
    assert admitted(scheduler) == ["a0"]
    for name in ("b1", "a1", "c1", "-1", "a2"):
        scheduler.add(seq(name))
    assert admitted(scheduler) == ["a1", "-1"]  # b1 is older but would add an adapter to every step


def test_a_new_adapter_brings_its_waiting_siblings_before_another_new_adapter() -> None:
    scheduler = make(rows=4)
    for name in ("b1", "c1", "b2", "c2", "b3"):
        scheduler.add(seq(name))
    assert admitted(scheduler) == ["b1", "b2", "b3", "c1"]


def test_without_affinity_admission_is_arrival_order() -> None:
    scheduler = make(rows=4, affinity=False)
    for name in ("b1", "c1", "b2", "c2", "b3"):
        scheduler.add(seq(name))
    assert admitted(scheduler) == ["b1", "c1", "b2", "c2"]


def test_siblings_past_the_affinity_window_wait_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "AFFINITY_WINDOW", 3)
    scheduler = make(rows=3)
    for name in ("b1", "c1", "d1", "b2"):
        scheduler.add(seq(name))
    assert admitted(scheduler) == ["b1", "c1", "d1"]


def test_a_rare_adapter_is_admitted_within_the_starvation_bound() -> None:
    """A stream of popular requests keeps both rows busy; the rare one gets in after 3 steps of being passed over."""
    scheduler = make(rows=2, starvation_steps=3)
    scheduler.add(seq("a0"))
    scheduler.add(seq("a1"))
    assert admitted(scheduler) == ["a0", "a1"]
    scheduler.add(seq("r1"))  # rare, now the oldest waiting request
    order: list[str] = []
    for i in range(2, 10):
        scheduler.add(seq(f"a{i}"))
        finish(scheduler, scheduler.running[0].request_id)  # one row frees up, another "a" request still runs
        order += admitted(scheduler)
    assert order[:3] == ["a2", "a3", "a4"]  # passed over while its adapter would add to every step ...
    assert order[3] == "r1"  # ... but only for starvation_steps steps
