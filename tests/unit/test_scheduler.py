"""The scheduler on fake slots: admission order (adapter affinity, its window, the starvation bound), failed loads,
KV blocks (admission by free blocks, the watermark, preemption and resumption, prefix-cache hits, forks)."""

import subprocess
import sys
from collections import Counter

import pytest

from server.engine import scheduler as scheduler_module
from server.engine.block_manager import BlockManager
from server.engine.request import EngineRequest, FinishReason, Status
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput

SAMPLED = 7  # the token every step "samples"


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


def make(
    rows: int,
    affinity: bool = True,
    starvation_steps: int = 32,
    blocks: BlockManager | None = None,
    tokens: int = 64,
    slots: FakeSlots | None = None,
) -> Scheduler:
    blocks = blocks if blocks is not None else BlockManager(256, 4)
    slots = slots if slots is not None else FakeSlots()
    return Scheduler(rows, tokens, slots, ReadyPrefetcher(), blocks, starvation_steps, adapter_affinity=affinity)


def seq(name: str, prompt: list[int] | None = None, prompt_logprobs: int | None = None) -> EngineRequest:
    """A request called ``name`` whose adapter is its first letter ("b2" -> "b"; "-" is the base model), with the
    adapter as its prefix-cache key."""
    adapter = None if name[0] == "-" else name[0]
    params = SamplingParams(max_new_tokens=4, prompt_logprobs=prompt_logprobs)
    prompt = prompt if prompt is not None else [1, 2, 3]
    return EngineRequest(name, adapter, list(prompt), params, arrival=0.0, cache_key=(adapter,))


def step(scheduler: Scheduler) -> SchedulerOutput:
    """Schedule a step and run it: the scheduler advances the scheduled sequences, and each that computed all its
    tokens samples one more (``SAMPLED``)."""
    plan = scheduler.schedule()
    scheduler.advance(plan.scheduled)
    for item in plan.scheduled:
        if item.req.num_computed == item.req.num_tokens:
            item.req.output_ids.append(SAMPLED)
    return plan


def admitted(scheduler: Scheduler) -> list[str]:
    """Run a step and name the sequences it admitted, in order."""
    before = set(map(id, scheduler.running))
    plan = step(scheduler)
    return [s.req.request_id for s in plan.scheduled if id(s.req) not in before]


def scheduled(plan: SchedulerOutput) -> list[tuple[str, int]]:
    return [(item.req.request_id, item.num_tokens) for item in plan.scheduled]


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
    blocks = BlockManager(16, 4)
    scheduler = make(rows=4, blocks=blocks, slots=slots)
    for name in ("a1", "b1", "a2", "-1"):
        scheduler.add(seq(name))
    plan = scheduler.schedule()
    assert len(plan.scheduled) == 4
    scheduler.drop_failed_loads(plan, {slots.slot_of["a"]: RuntimeError("device out of memory")})
    assert sorted(item.req.request_id for item in plan.scheduled) == ["-1", "b1"]
    assert sorted(r.request_id for r in plan.aborted) == ["a1", "a2"]
    for req in plan.aborted:
        assert req.status is Status.FINISHED and req.finish_reason is FinishReason.ERROR and req.block_table == []
        assert "adapter 'a' failed to load: device out of memory" == req.error
    assert slots.pins["a"] == 0 and scheduler.num_running == 2 and blocks.num_used == 2


def test_the_scheduler_and_the_registry_do_not_import_torch() -> None:
    """Torch-free by design: admission and the adapter registry are tested without a model and load in no time."""
    code = (
        "import sys, server.engine.scheduler, server.engine.block_manager, server.adapters.registry; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('server'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _group(size: int, prompt_len: int) -> list[EngineRequest]:
    prompt = list(range(1, prompt_len + 1))
    group = [EngineRequest(f"g{i}", "g", list(prompt), SamplingParams(max_new_tokens=4), 0.0) for i in range(size)]
    for child in group[1:]:
        child.fork_parent = group[0]
    return group


def test_forked_sequences_wait_for_the_shared_prefill_then_share_all_but_the_last_prompt_token() -> None:
    blocks = BlockManager(16, 4)
    scheduler = make(rows=4, affinity=False, blocks=blocks, tokens=8)  # a 12-token prompt: 2 steps
    parent, child, other = [*_group(2, 12), seq("-x")]
    for req in (parent, child, other):
        scheduler.add(req)
    assert admitted(scheduler) == ["g0"]  # the whole budget goes to the prompt's first chunk
    assert admitted(scheduler) == ["-x"]  # the parent still prefills: its child waits, the next request does not
    plan = scheduler.schedule()
    forked = [item for item in plan.scheduled if item.req is child]
    assert forked and forked[0].num_tokens == 1 and child.num_computed == 11 and child.num_cached_tokens == 0
    # 11 positions: two full blocks shared, the third (3 positions) copied into the child's own block
    assert child.block_table[:2] == parent.block_table[:2] and len(child.block_table) == 3
    assert forked[0].copy_blocks == ((parent.block_table[2], child.block_table[2]),)
    assert blocks.num_used == 4 + 1 + 1  # the parent's (13 positions with its next token), -x's, the child's copy


def test_a_forked_sequence_prefills_alone_when_its_parent_has_finished() -> None:
    scheduler = make(rows=1)
    parent, child = _group(2, 5)
    scheduler.add(parent)
    scheduler.add(child)
    assert admitted(scheduler) == ["g0"]
    assert admitted(scheduler) == []  # no free row
    scheduler.finish(parent, FinishReason.LENGTH)
    plan = scheduler.schedule()
    assert [(i.req.request_id, i.num_tokens, i.copy_blocks) for i in plan.scheduled] == [("g1", 5, ())]
    assert child.fork_parent is None


def test_max_rows_caps_the_running_requests_whatever_the_free_blocks() -> None:
    scheduler = make(rows=2)
    for name in ("a1", "a2", "a3", "a4"):
        scheduler.add(seq(name))
    assert admitted(scheduler) == ["a1", "a2"]
    assert admitted(scheduler) == [] and scheduler.num_running == 2 and scheduler.blocks.num_free > 200


def test_admission_waits_for_free_blocks() -> None:
    blocks = BlockManager(4, 4)  # a pool under 100 blocks: no watermark
    scheduler = make(rows=4, blocks=blocks)
    scheduler.add(seq("a1", list(range(10))))  # 3 blocks
    scheduler.add(seq("a2", list(range(20, 28))))  # 2 blocks: only 1 is left
    assert admitted(scheduler) == ["a1"]
    assert admitted(scheduler) == [] and scheduler.num_waiting == 1
    finish(scheduler, "a1")
    assert admitted(scheduler) == ["a2"]


def test_admission_leaves_a_watermark_of_blocks_free_while_requests_run() -> None:
    blocks = BlockManager(200, 4)  # watermark: 2 blocks
    scheduler = make(rows=4, blocks=blocks, tokens=1024)
    assert scheduler.watermark == 2
    scheduler.add(seq("a1"))  # 1 block
    assert admitted(scheduler) == ["a1"]
    scheduler.add(seq("a2", list(range(4 * 199))))  # 199 blocks: all the free ones, into the watermark
    assert admitted(scheduler) == []
    finish(scheduler, "a1")
    assert admitted(scheduler) == ["a2"]  # nothing runs: the whole pool may go
    scheduler.add(seq("a3", [5]))
    assert admitted(scheduler) == []  # 1 block is free, 1 is needed: it would eat the watermark


def _preempting(blocks: BlockManager, slots: FakeSlots) -> tuple[Scheduler, EngineRequest, EngineRequest]:
    """a1 then b1 run on a pool of 4 two-position blocks with a 3-token prompt each: on the third step a1 needs a
    third block, and none is free."""
    scheduler = make(rows=4, blocks=blocks, slots=slots)
    old, new = seq("a1", [1, 2, 3]), seq("b1", [4, 5, 6])
    scheduler.add(old)
    scheduler.add(new)
    assert admitted(scheduler) == ["a1", "b1"]
    assert scheduled(step(scheduler)) == [("a1", 1), ("b1", 1)]
    return scheduler, old, new


def test_when_the_pool_runs_dry_the_newest_request_is_preempted_and_later_recomputes_everything() -> None:
    slots = FakeSlots()
    blocks = BlockManager(4, 2, prefix_caching=False)
    scheduler, old, new = _preempting(blocks, slots)
    scheduler.add(seq("a2", [9]))  # would fit in the block left over, but not in the step that preempted
    plan = step(scheduler)
    assert scheduled(plan) == [("a1", 1)] and plan.preempted == [new] and not plan.aborted
    assert new.status is Status.WAITING and new.num_computed == 0 and new.block_table == [] and new.slot is None
    assert new.num_preemptions == 1 and slots.pins["b"] == 0
    assert [r.request_id for r in scheduler.waiting] == ["b1", "a2"] and scheduler.running == [old]
    assert new.output_ids == [SAMPLED, SAMPLED]  # kept: it resumes with the same output
    finish(scheduler, "a1")
    plan = step(scheduler)
    assert scheduled(plan) == [("b1", 5), ("a2", 1)]  # b1 first: its prompt and both its tokens, computed again
    assert new.num_cached_tokens == 0 and slots.pins["b"] == 1 and new.status is Status.RUNNING


def test_a_request_that_needs_a_block_preempts_itself_when_it_is_the_newest() -> None:
    blocks = BlockManager(3, 4)
    scheduler = make(rows=4, blocks=blocks)
    old, new = seq("a1", [1]), seq("a2", list(range(8)))  # 1 block (4 positions) and 2 full blocks
    scheduler.add(old)
    scheduler.add(new)
    assert admitted(scheduler) == ["a1", "a2"]
    plan = step(scheduler)  # a1's second token fits its block; a2's ninth needs a third block
    assert scheduled(plan) == [("a1", 1)] and plan.preempted == [new] and scheduler.waiting[0] is new


def test_a_preempted_request_resumes_from_its_own_cached_blocks() -> None:
    blocks = BlockManager(4, 2)
    scheduler, old, new = _preempting(blocks, FakeSlots())
    first_block = new.block_table[0]
    plan = step(scheduler)
    assert plan.preempted == [new]  # its two computed blocks went to the prefix cache; a1 took the tail one
    assert blocks.num_cached == 1
    finish(scheduler, "a1")
    plan = step(scheduler)
    # 5 tokens: the first block (2 positions) is cached; 3 are computed again
    assert scheduled(plan) == [("b1", 3)] and new.num_cached_tokens == 2
    assert new.block_table[0] == first_block


def test_a_new_request_prefills_only_what_its_adapter_has_not_cached() -> None:
    blocks = BlockManager(64, 2)
    scheduler = make(rows=8, blocks=blocks)
    prompt = [1, 2, 3, 4, 5, 6]
    scheduler.add(seq("a1", prompt))
    assert admitted(scheduler) == ["a1"]
    same, longer, other, scoring = seq("a2", prompt), seq("a3", [*prompt, 9]), seq("b1", prompt), seq("a4", prompt, 0)
    for req in (same, longer, other, scoring):
        scheduler.add(req)
    plan = step(scheduler)
    assert scheduled(plan) == [("a1", 1), ("a2", 2), ("a3", 1), ("a4", 6), ("b1", 6)]
    assert (same.num_cached_tokens, longer.num_cached_tokens, scoring.num_cached_tokens) == (4, 6, 0)
    assert other.num_cached_tokens == 0  # another adapter's cache key
    assert blocks.hit_tokens == 10


def test_a_request_that_finds_too_few_blocks_ends_admission_for_the_step() -> None:
    """No overtaking on memory: a small request behind a large one waits, so the large one is not starved."""
    blocks = BlockManager(6, 4)
    scheduler = make(rows=4, affinity=False, blocks=blocks)
    scheduler.add(seq("a1", list(range(12))))  # 3 blocks
    assert admitted(scheduler) == ["a1"]
    scheduler.add(seq("b1", list(range(16))))  # 4 blocks: 3 are free
    scheduler.add(seq("c1", [1]))  # 1 block: would fit
    assert admitted(scheduler) == []
    finish(scheduler, "a1")
    assert admitted(scheduler) == ["b1", "c1"]
