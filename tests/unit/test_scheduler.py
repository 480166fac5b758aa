"""Scheduler admission order on fake slots: adapter affinity, its window, the starvation bound, failed loads."""

import subprocess
import sys
from collections import Counter

import pytest

from server.engine import scheduler as scheduler_module
from server.engine.request import EngineRequest, FinishReason, Status
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler


class FakeSlots:
    """Every adapter is resident; ``reserve`` pins and hands out one slot per adapter name."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.pins: Counter[str] = Counter()

    def tier(self, name: str) -> str:
        return "gpu"

    def reserve(self, name: str) -> int:
        self.pins[name] += 1
        return self.slot_of.setdefault(name, len(self.slot_of) + 1)

    def release(self, name: str, slot: int | None = None) -> None:
        self.pins[name] -= 1


class ReadyPrefetcher:
    """Every adapter read has finished."""

    def state(self, name: str) -> str:
        return "ready"

    def request(self, name: str, urgent: bool = False) -> bool:
        return True

    def error(self, name: str) -> BaseException | None:
        return None

    def forget(self, name: str) -> None:
        pass


def make(rows: int, affinity: bool = True, starvation_steps: int = 32) -> Scheduler:
    return Scheduler(rows, 64, FakeSlots(), ReadyPrefetcher(), starvation_steps, adapter_affinity=affinity)


def seq(name: str) -> EngineRequest:
    """A request called ``name`` whose adapter is its first letter ("b2" -> "b"; "-" is the base model)."""
    adapter = None if name[0] == "-" else name[0]
    return EngineRequest(name, adapter, [1, 2, 3], SamplingParams(max_new_tokens=4), arrival=0.0)


def admitted(scheduler: Scheduler) -> list[str]:
    """Schedule a step, run it (advance every scheduled sequence) and name the sequences it admitted, in order."""
    before = set(map(id, scheduler.running))
    plan = scheduler.schedule()
    for item in plan.scheduled:
        item.req.num_computed += item.num_tokens
    return [s.req.request_id for s in plan.scheduled if id(s.req) not in before]


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


def test_a_failed_adapter_write_fails_only_the_requests_on_that_slot() -> None:
    """Admission reserved the slots; the engine's device write into one failed: its requests finish with an error
    and give back their rows and pins, the others run."""
    slots = FakeSlots()
    scheduler = Scheduler(4, 64, slots, ReadyPrefetcher())
    for name in ("a1", "b1", "a2", "-1"):
        scheduler.add(seq(name))
    plan = scheduler.schedule()
    assert len(plan.scheduled) == 4
    scheduler.drop_failed_loads(plan, {slots.slot_of["a"]: RuntimeError("device out of memory")})
    assert sorted(item.req.request_id for item in plan.scheduled) == ["-1", "b1"]
    assert sorted(r.request_id for r in plan.aborted) == ["a1", "a2"]
    for req in plan.aborted:
        assert req.status is Status.FINISHED and req.finish_reason is FinishReason.ERROR and req.row is None
        assert "adapter 'a' failed to load: device out of memory" == req.error
    assert slots.pins["a"] == 0 and scheduler.num_running == 2


def test_the_scheduler_and_the_registry_do_not_import_torch() -> None:
    """Torch-free by design: admission and the adapter registry are tested without a model and load in no time."""
    code = (
        "import sys, server.engine.scheduler, server.adapters.registry; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('server'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _group(size: int, prompt_len: int) -> list[EngineRequest]:
    prompt = list(range(1, prompt_len + 1))
    group = [EngineRequest(f"g{i}", "g", prompt, SamplingParams(max_new_tokens=4), arrival=0.0) for i in range(size)]
    for child in group[1:]:
        child.fork_parent = group[0]
    return group


def test_forked_sequences_wait_for_the_shared_prefill_then_copy_all_but_the_last_prompt_token() -> None:
    scheduler = Scheduler(4, 8, FakeSlots(), ReadyPrefetcher(), adapter_affinity=False)  # 12-token prompt: 2 steps
    parent, child, other = [*_group(2, 12), seq("-x")]
    for req in (parent, child, other):
        scheduler.add(req)
    assert admitted(scheduler) == ["g0"]  # the whole budget goes to the prompt's first chunk
    assert admitted(scheduler) == ["-x"]  # the parent still prefills: its child waits, the next request does not
    plan = scheduler.schedule()
    forked = [item for item in plan.scheduled if item.req is child]
    assert forked and forked[0].fork_from == (parent.row, 11) and forked[0].num_tokens == 1
    assert child.num_computed == 11 and child.row != parent.row


def test_a_forked_sequence_prefills_alone_when_its_parent_has_finished() -> None:
    scheduler = Scheduler(1, 64, FakeSlots(), ReadyPrefetcher())
    parent, child = _group(2, 5)
    scheduler.add(parent)
    scheduler.add(child)
    assert admitted(scheduler) == ["g0"]
    assert admitted(scheduler) == []  # no free row
    scheduler.finish(parent, FinishReason.LENGTH)
    plan = scheduler.schedule()
    assert [(i.req.request_id, i.num_tokens, i.fork_from) for i in plan.scheduled] == [("g1", 5, None)]
    assert child.fork_parent is None
