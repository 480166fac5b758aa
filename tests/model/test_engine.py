"""The engine against PEFT's ``generate``: token for token, mixed adapters, staggered arrivals, chunked prompts."""

import asyncio
import dataclasses
import gc
import random
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from loadtests.common.peft_reference import PeftReference
from server.engine import engine as engine_module
from server.engine.errors import EngineStoppedError, RequestError
from server.engine.handle import RequestHandle, RequestResult
from server.engine.loop import MAX_FAILED_STEPS
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from tests.helpers.engines import make_engine, run_until_done
from tests.helpers.slot_cache_probe import pin_count


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_adapters):
    adapters = {f"a{i}": p for i, p in enumerate(tiny_adapters("llama"))}
    reference = PeftReference(tiny_model_dir("llama"), list(adapters.values()))
    reference.model.generation_config.eos_token_id = None  # compare full lengths; EOS is tested on its own
    return tiny_model_dir("llama"), adapters, reference


def peft_greedy(reference: PeftReference, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = {
        "max_new_tokens": n,
        "do_sample": False,
        "pad_token_id": 2,
        "eos_token_id": None,
        "attention_mask": torch.ones_like(ids),
    }  # never let generate mask prompt tokens equal to the pad id
    with torch.inference_mode():
        if adapter is None:
            with reference.model.disable_adapter():
                out = reference.model.generate(input_ids=ids, **kwargs)
        else:
            reference.model.set_adapter(reference.names[int(adapter[1:])])
            out = reference.model.generate(input_ids=ids, **kwargs)
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_peft_with_staggered_mixed_requests(setup) -> None:
    model_dir, adapters, reference = setup
    engine = make_engine(model_dir, adapters, slots=3)
    rng = random.Random(0)
    requests = []
    for _ in range(14):
        adapter = rng.choice([None, *adapters])
        prompt = [rng.randrange(5, 380) for _ in range(rng.randint(1, 50))]
        requests.append((adapter, prompt, rng.randint(1, 20)))
    handles = []
    for i, (adapter, prompt, n) in enumerate(requests):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        handles.append(engine.submit(prompt, adapter, params))
        for _ in range(i % 3):  # arrivals between steps, while others are mid-prompt or decoding
            engine.step()
    run_until_done(engine)
    for (adapter, prompt, n), handle in zip(requests, handles, strict=True):
        result = handle.result()
        assert result.finish_reason == FinishReason.LENGTH
        assert result.token_ids == peft_greedy(reference, prompt, adapter, n), f"adapter {adapter}"
        assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert engine.slot_cache.stats.evictions > 0  # six adapters through three slots
    assert not engine.scheduler.running and all(pin_count(engine.slot_cache, a) == 0 for a in adapters)


def test_seeded_sampling_is_reproducible_and_batch_independent(setup) -> None:
    model_dir, adapters, _ = setup
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    prompt = [10, 20, 30, 40]

    alone = make_engine(model_dir, adapters)
    h = alone.submit(prompt, "a2", params)
    run_until_done(alone)
    expected = h.result().token_ids

    busy = make_engine(model_dir, adapters)
    others = [
        busy.submit([7 + i] * (3 + i), a, SamplingParams(max_new_tokens=30, temperature=1.0, ignore_eos=True))
        for i, a in enumerate(["a0", None, "a2", "a5"])
    ]
    busy.step()
    h2 = busy.submit(prompt, "a2", params)
    run_until_done(busy)
    assert h2.result().token_ids == expected
    assert all(o.result().finish_reason == FinishReason.LENGTH for o in others)
    different = busy.submit(prompt, "a2", SamplingParams(**{**params.__dict__, "seed": 8}))
    run_until_done(busy)
    assert different.result().token_ids != expected


def test_stop_strings_eos_and_streamed_text(setup) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    prompt = [11, 12, 13, 14, 15]
    full = engine.submit(prompt, "a1", SamplingParams(max_new_tokens=30, ignore_eos=True))
    run_until_done(engine)
    outputs = list(full)  # already finished: replays the queued events
    text = "".join(o.text for o in outputs)
    assert len(outputs) == 30 and text == engine.tokenizer.decode([t for o in outputs for t in o.token_ids])

    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = engine.submit(prompt, "a1", SamplingParams(max_new_tokens=30, stop=(stop,), ignore_eos=True))
    run_until_done(engine)
    events = list(stopped)
    assert events[-1].finish_reason == FinishReason.STOP
    assert "".join(e.text for e in events) == text[: text.index(stop)]

    eos_token = [t for o in outputs for t in o.token_ids][4]
    engine.outputs.eos_ids = frozenset({eos_token})
    at_eos = engine.submit(prompt, "a1", SamplingParams(max_new_tokens=30))
    run_until_done(engine)
    result = at_eos.result()
    assert result.finish_reason == FinishReason.EOS and result.token_ids[-1] == eos_token
    assert len(result.token_ids) <= 5


def test_cancel_frees_row_and_pin(setup) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    handle = engine.submit([5] * 10, "a3", SamplingParams(max_new_tokens=100, ignore_eos=True))
    for _ in range(500):  # the adapter is read on the loader thread first
        engine.step()
        if pin_count(engine.slot_cache, "a3"):
            break
        time.sleep(0.01)
    engine.step()
    assert pin_count(engine.slot_cache, "a3") == 1 and engine.num_running == 1
    handle.cancel()
    engine.step()
    assert pin_count(engine.slot_cache, "a3") == 0 and engine.num_running == 0
    result = handle.result()
    assert result.finish_reason == FinishReason.CANCELLED and 0 < result.completion_tokens < 100


def test_no_step_needs_more_adapters_than_slots_and_nobody_starves(setup) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters, slots=1, max_batch_size=4, starvation_steps=4)
    seen: list[set[int]] = []
    run = engine.runner.run

    def spy(chunks, copies=()):
        seen.append({c.slot for c in chunks if c.slot != 0})
        return run(chunks, copies)

    engine.runner.run = spy
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    rare = None
    handles = []
    for i in range(40):  # a stream of popular-adapter requests, and one for a rare adapter early on
        handles.append(engine.submit([3, 4, 5], "a0", params))
        if i == 2:
            rare = engine.submit([3, 4, 5], "a4", params)
        engine.step()
        engine.step()
    run_until_done(engine)
    assert all(len(s) <= 1 for s in seen)
    assert rare is not None and rare.result().finish_reason == FinishReason.LENGTH
    assert all(h.result().finish_reason == FinishReason.LENGTH for h in handles)


def test_loading_adapter_does_not_block_others(setup, monkeypatch) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    gate = threading.Event()
    read = engine.model.read_adapter

    def slow_read(folder):
        gate.wait(10)
        return read(folder)

    monkeypatch.setattr(engine.model, "read_adapter", slow_read)
    slow = engine.submit([1, 2, 3], "a5", SamplingParams(max_new_tokens=3, ignore_eos=True))
    fast = engine.submit([1, 2, 3], None, SamplingParams(max_new_tokens=3, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert fast.result().finish_reason == FinishReason.LENGTH  # finished while a5 was still loading
    assert engine.prefetcher.state("a5") == "pending"
    gate.set()
    run_until_done(engine)
    assert slow.result().finish_reason == FinishReason.LENGTH


def test_bad_requests_and_a_corrupt_adapter(setup, tmp_path) -> None:
    model_dir, adapters, _ = setup
    broken = tmp_path / "broken"
    shutil.copytree(adapters["a0"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = make_engine(model_dir, {**adapters, "broken": broken})
    with pytest.raises(RequestError, match="unknown adapter"):
        engine.submit([1, 2], "nope")
    with pytest.raises(RequestError, match="exceeds the maximum sequence length"):
        engine.submit([1] * 100, None, SamplingParams(max_new_tokens=100))
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], None)
    bad = engine.submit([1, 2, 3], "broken", SamplingParams(max_new_tokens=4, ignore_eos=True))
    good = engine.submit([1, 2, 3], "a0", SamplingParams(max_new_tokens=4, ignore_eos=True))
    run_until_done(engine)
    failed = bad.result()
    assert failed.finish_reason == FinishReason.ERROR and "safetensors" in (failed.error or "")
    assert good.result().finish_reason == FinishReason.LENGTH


def test_async_streaming_on_the_engine_thread(setup) -> None:
    model_dir, adapters, reference = setup
    engine = make_engine(model_dir, adapters)
    engine.start()
    try:

        async def consume(prompt: list[int], adapter: str | None) -> tuple[list[int], str]:
            handle = engine.submit(prompt, adapter, SamplingParams(max_new_tokens=8, ignore_eos=True),
                                   loop=asyncio.get_running_loop())  # fmt: skip
            tokens, text = [], ""
            async for out in handle:
                tokens.extend(out.token_ids)
                text += out.text
            return tokens, text

        async def main():
            return await asyncio.gather(consume([9, 8, 7], "a1"), consume([4, 4], None), consume([1], "a4"))

        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for (tokens, text), (prompt, adapter) in zip(
        results, [([9, 8, 7], "a1"), ([4, 4], None), ([1], "a4")], strict=True
    ):
        assert tokens == peft_greedy(reference, prompt, adapter, 8)
        assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving(setup, monkeypatch) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    real_sample = engine_module.sample
    calls = {"n": 0}

    def flaky_sample(logits, samplers):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_sample(logits, samplers)

    monkeypatch.setattr(engine_module, "sample", flaky_sample)
    engine.start()
    try:
        failed = engine.submit([1, 2, 3], None, SamplingParams(max_new_tokens=3, ignore_eos=True)).result()
        assert failed.finish_reason == FinishReason.ERROR and "boom" in (failed.error or "")
        ok = engine.submit([1, 2, 3], "a0", SamplingParams(max_new_tokens=3, ignore_eos=True)).result()
        assert ok.finish_reason == FinishReason.LENGTH
        assert engine.num_running == 0
    finally:
        engine.shutdown()


def test_out_of_memory_fails_the_batch_with_a_clear_error_and_serving_goes_on(setup, monkeypatch) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    real_run = engine.runner._run
    calls = {"n": 0}

    def oom_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(*args)

    monkeypatch.setattr(engine.runner, "_run", oom_once)
    engine.start()
    try:
        failed = engine.submit([1, 2, 3], "a0", SamplingParams(max_new_tokens=3, ignore_eos=True)).result()
        assert failed.finish_reason == FinishReason.ERROR
        assert "out of accelerator memory" in (failed.error or "") and "2.00 GiB" in (failed.error or "")
        ok = engine.submit([1, 2, 3], "a0", SamplingParams(max_new_tokens=3, ignore_eos=True)).result()
        assert ok.finish_reason == FinishReason.LENGTH and engine.num_running == 0
        assert pin_count(engine.slot_cache, "a0") == 0
    finally:
        engine.shutdown()


def test_deadlines_and_per_request_limits(setup) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters, max_batch_size=1, max_prompt_tokens=8, max_new_tokens=50)
    with pytest.raises(RequestError, match="limit is 8"):
        engine.submit(list(range(1, 10)), None, SamplingParams(max_new_tokens=2))
    with pytest.raises(RequestError, match="limit is 50"):
        engine.submit([1, 2], None, SamplingParams(max_new_tokens=51))
    long = SamplingParams(max_new_tokens=50, ignore_eos=True)
    running = engine.submit([1, 2, 3], None, long)
    waiting = engine.submit([1, 2, 3], "a1", long, timeout=0.05)  # waits for the only row, past its deadline
    for _ in range(3):
        engine.step()
    time.sleep(0.06)
    run_until_done(engine)
    assert running.result().finish_reason == FinishReason.LENGTH
    timed_out = waiting.result()
    assert timed_out.finish_reason == FinishReason.TIMEOUT and timed_out.completion_tokens == 0
    mid = engine.submit([1, 2, 3], None, long, timeout=0.05)
    engine.step()
    time.sleep(0.06)
    run_until_done(engine)
    result = mid.result()
    assert result.finish_reason == FinishReason.TIMEOUT and 0 < result.completion_tokens < 50
    assert engine.num_running == 0 and not engine.has_work()


def test_adapter_deleted_while_waiting_finishes_as_deleted_not_failed(setup) -> None:
    model_dir, adapters, _ = setup
    registered = dict(adapters)
    engine = make_engine(model_dir, registered)
    handle = engine.submit([1, 2, 3], "a2", SamplingParams(max_new_tokens=2))
    del registered["a2"]  # the registry forgets it before the engine reads it
    engine.forget_adapter("a2")
    run_until_done(engine)
    result = handle.result()
    assert result.finish_reason == FinishReason.ADAPTER_DELETED and "deleted" in (result.error or "")


def test_adapter_deleted_during_its_read_finishes_as_deleted_not_failed(setup, tmp_path) -> None:
    """The delete moves the folder away while the loader thread reads it (the soak's delete-race): the request must
    end as ADAPTER_DELETED (404), not as a failed load (503)."""
    model_dir, adapters, _ = setup
    registered = dict(adapters)
    gone = tmp_path / "moved-away"  # the path the registry handed out, whose folder no longer exists

    lookups = {"a2": 0}

    def adapter_path(name: str) -> Path:
        path = registered[name]  # KeyError once deleted
        if name == "a2":
            lookups["a2"] += 1
            if lookups["a2"] == 2:  # the loader's lookup (the first is submit's): deleted right after it
                del registered["a2"]
                return gone
        return path

    engine = make_engine(model_dir, adapters)
    engine.adapter_path = adapter_path
    handle = engine.submit([1, 2, 3], "a2", SamplingParams(max_new_tokens=2))
    run_until_done(engine)
    result = handle.result()
    assert result.finish_reason == FinishReason.ADAPTER_DELETED, result.error


def test_non_finite_logits_fail_only_their_request(setup, monkeypatch) -> None:
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    real_run = engine.runner._run
    calls = {"n": 0}

    def poisoned(*args):
        out = real_run(*args)
        logits = out.sample.clone()  # out of inference mode, so it can be edited
        calls["n"] += 1
        if calls["n"] == 1:
            logits[0] = float("nan")  # the first scheduled request's row, as a broken adapter would make it
        return dataclasses.replace(out, sample=logits)

    monkeypatch.setattr(engine.runner, "_run", poisoned)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    broken = engine.submit([1, 2, 3], "a0", params)
    fine = engine.submit([4, 5, 6], "a1", params)
    run_until_done(engine)
    failed, served = broken.result(), fine.result()
    assert failed.finish_reason == FinishReason.ERROR and "non-finite" in (failed.error or "")
    assert served.finish_reason == FinishReason.LENGTH and served.completion_tokens == 4
    assert engine.num_running == 0


def result_within(handle: RequestHandle, seconds: float) -> RequestResult:
    """``handle.result()``, failing the test instead of hanging when the engine never finishes the request."""
    box: list[RequestResult] = []
    reader = threading.Thread(target=lambda: box.append(handle.result()), daemon=True)
    reader.start()
    reader.join(seconds)
    assert box, f"request {handle.request_id} got no final event within {seconds} s"
    return box[0]


def test_prefetched_reads_are_bounded_and_dropped_when_nobody_waits(setup, monkeypatch) -> None:
    """24 requests for 24 distinct adapters wait on a slow disk, then are cancelled: the prefetcher never holds more
    than --cpu-slots reads, reads for the cancelled requests never start, and the one already running is dropped
    when it completes (before: 24 reads queued, all of them run, and all 24 host copies stay forever)."""
    model_dir, adapters, _ = setup
    names = {f"x{i}": adapters[f"a{i % len(adapters)}"] for i in range(24)}
    engine = make_engine(model_dir, {**names, "fresh": adapters["a0"]}, cpu_slots=2)
    gate = threading.Event()
    read = engine.model.read_adapter
    started: list[Path] = []
    results: list[weakref.ref] = []

    def slow_read(folder):
        started.append(folder)
        gate.wait(10)
        weights = read(folder)
        results.append(weakref.ref(weights))
        return weights

    monkeypatch.setattr(engine.model, "read_adapter", slow_read)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    handles = [engine.submit([1, 2, 3], name, params) for name in names]
    for _ in range(5):
        engine.step()
        assert len(engine.prefetcher) <= engine.prefetcher.capacity == 2
    for handle in handles:
        handle.cancel()
    engine.step()
    assert len(engine.prefetcher) == 0
    assert all(h.result().finish_reason == FinishReason.CANCELLED for h in handles)
    gate.set()
    # The loader is one FIFO worker: once this request's read is done, every read queued before it has run.
    fresh = engine.submit([1, 2, 3], "fresh", params)
    run_until_done(engine)
    assert fresh.result().finish_reason == FinishReason.LENGTH
    assert len(started) == 2  # x0's read (running when cancelled) and fresh's; x1's was cancelled before it started
    gc.collect()
    assert [r for r in results[:-1] if r() is not None] == []  # nothing keeps a cancelled request's read
    assert len(engine.prefetcher) == 0


def test_the_engine_stops_for_good_when_failing_its_requests_fails(setup, monkeypatch) -> None:
    """The watchdog: a step fails outside the model and so does failing its requests (an exception in Engine.fail_all),
    which used to end the engine thread silently with every request hanging. Now every request held, running or
    waiting, gets an error at once, ``running`` is false (/ready answers 503) and ``submit`` refuses."""
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters, max_batch_size=1)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=100, ignore_eos=True)
        running = engine.submit([1, 2, 3], None, params)
        next(iter(running))  # its first token: it holds the only row
        waiting = [engine.submit([4, 5, 6], adapter, params) for adapter in (None, "a1")]

        def broken(*args, **kwargs):
            raise RuntimeError("scheduler state corrupted")

        monkeypatch.setattr(engine.scheduler, "finish", broken)
        monkeypatch.setattr(engine.scheduler, "schedule", broken)
        started = time.monotonic()
        for handle in [running, *waiting]:
            result = result_within(handle, 10)
            assert result.finish_reason == FinishReason.ERROR
            assert "engine stopped" in (result.error or "") and "scheduler state corrupted" in (result.error or "")
        assert time.monotonic() - started < 5
        assert not engine.running and "scheduler state corrupted" in (engine.stopped_reason or "")
        with pytest.raises(EngineStoppedError, match="scheduler state corrupted"):
            engine.submit([1, 2, 3], None, params)
    finally:
        engine.shutdown()


def test_a_step_that_keeps_failing_stops_the_engine(setup, monkeypatch) -> None:
    """One failing step fails the requests in flight and the loop goes on; MAX_FAILED_STEPS in a row mean the
    engine itself is broken: it stops, so that /ready sends clients elsewhere instead of failing them one by one."""
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)

    def broken():
        raise RuntimeError("schedule broke")

    monkeypatch.setattr(engine.scheduler, "schedule", broken)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        for _ in range(MAX_FAILED_STEPS - 1):
            failed = result_within(engine.submit([1, 2, 3], None, params), 10)
            assert failed.finish_reason == FinishReason.ERROR and "schedule broke" in (failed.error or "")
            assert engine.running
        last = result_within(engine.submit([1, 2, 3], None, params), 10)
        assert last.finish_reason == FinishReason.ERROR and "engine stopped" in (last.error or "")
        assert not engine.running
        with pytest.raises(EngineStoppedError, match="schedule broke"):
            engine.submit([1, 2, 3], None, params)
    finally:
        engine.shutdown()


def test_a_failed_adapter_write_fails_its_requests_and_the_engine_goes_on(setup, monkeypatch) -> None:
    """Admission only reserves the slot; the step writes the weights. When that write fails, the requests on that
    adapter end with an error, the slot is free again, the other requests are served, and a later request for the
    same adapter loads it afresh."""
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    write = engine.model.write_slot
    writes: list[int] = []

    def fails_once(slot, weights, offset=None):
        writes.append(slot)
        if len(writes) == 1:
            raise RuntimeError("device write failed")
        write(slot, weights, offset)

    monkeypatch.setattr(engine.model, "write_slot", fails_once)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    failing = [engine.submit([1, 2, 3], "a2", params) for _ in range(2)]  # siblings: admitted in the same step
    base = engine.submit([1, 2, 3], None, params)
    run_until_done(engine)
    for handle in failing:
        result = handle.result()
        assert result.finish_reason == FinishReason.ERROR and result.completion_tokens == 0
        assert result.error == "adapter 'a2' failed to load: device write failed"
    assert base.result().finish_reason == FinishReason.LENGTH
    assert pin_count(engine.slot_cache, "a2") == 0 and engine.adapter_tier("a2") != "gpu"
    assert engine.num_running == 0 and engine.cache_stats.load_failures == 1
    again = engine.submit([1, 2, 3], "a2", params)
    run_until_done(engine)
    assert again.result().finish_reason == FinishReason.LENGTH and len(writes) == 2
