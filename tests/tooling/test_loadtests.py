"""loadtests: the trace generator's statistics, and the load driver against a real server on a tiny model."""

import asyncio
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from loadtests import driver, driver_report
from loadtests.common.server_process import ServerProcess
from loadtests.trace import (
    TraceConfig,
    TraceRequest,
    generate,
    load,
    offered_rate,
    popularity_probabilities,
    prompt_text,
    save,
    scale_to_rate,
)
from tests.helpers.paths import REPO_ROOT


def _gaps(trace: list[TraceRequest]) -> list[float]:
    times = [0.0] + [r.arrival for r in trace]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


# ---- trace generator --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_arrivals_have_the_rate_and_cv(cv: float) -> None:
    trace = generate(TraceConfig(adapters=4, rate=5.0, cv=cv, requests=40_000, prompt_len=(1, 1),
                                 output_len=(1, 1), text=False))  # fmt: skip
    gaps = _gaps(trace)
    assert all(g >= 0 for g in gaps)  # cv 3: Gamma(1/9) gaps are often tiny enough to vanish in the sum
    assert offered_rate(trace) == pytest.approx(5.0, rel=0.05)
    mean, sd = statistics.fmean(gaps), statistics.pstdev(gaps)
    assert mean == pytest.approx(0.2, rel=0.05)
    assert sd / mean == pytest.approx(cv, rel=0.1)


def test_cv_zero_is_evenly_spaced() -> None:
    trace = generate(TraceConfig(rate=4.0, cv=0.0, requests=50, text=False))
    assert _gaps(trace) == pytest.approx([0.25] * 50)


def _shares(config: TraceConfig) -> list[float]:
    counts = Counter(r.adapter for r in generate(config))
    return [counts[f"a{i:04d}"] / config.num_requests for i in range(config.adapters)]


def test_popularity_laws_match_their_probabilities() -> None:
    # exact values by hand: S-LoRA's power law P(0) = (1/N)^alpha; zipf over 3 with alpha 1 = 6/11, 3/11, 2/11
    assert popularity_probabilities(10, "power", 0.3)[0] == pytest.approx(0.1**0.3)
    assert popularity_probabilities(3, "zipf", 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert popularity_probabilities(4, "power", 1.0) == pytest.approx([0.25] * 4)  # alpha 1 is uniform
    n = 20_000
    for popularity, alpha in (("power", 0.3), ("power", 1.0), ("zipf", 1.2), ("uniform", 1.0)):
        config = TraceConfig(adapters=10, popularity=popularity, alpha=alpha, requests=n, text=False)  # type: ignore[arg-type]
        expected = popularity_probabilities(10, popularity, alpha)  # type: ignore[arg-type]
        for got, p in zip(_shares(config), expected, strict=True):
            assert abs(got - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (popularity, alpha)


def test_power_law_skews_popularity_towards_the_first_adapters() -> None:
    skewed = _shares(TraceConfig(adapters=10, alpha=0.3, requests=20_000, text=False))
    assert skewed[0] == max(skewed) and skewed[0] > 0.45
    assert skewed[0] > skewed[1] > skewed[3] > skewed[9]
    assert sum(skewed[:5]) > 2 * sum(skewed[5:])
    zipf = _shares(TraceConfig(adapters=10, popularity="zipf", alpha=1.0, requests=20_000, text=False))
    assert zipf[0] > zipf[1] > zipf[2] > zipf[9]
    flat = _shares(TraceConfig(adapters=10, popularity="uniform", requests=20_000, text=False))
    assert max(flat) < 1.15 * min(flat)


def test_lengths_are_uniform_over_inclusive_ranges_and_prompts_have_that_many_words() -> None:
    trace = generate(TraceConfig(adapters=3, requests=5000, prompt_len=(8, 40), output_len=(3, 9)))
    prompt_lens = [r.prompt_len for r in trace]
    outputs = [r.max_new_tokens for r in trace]
    assert set(prompt_lens) == set(range(8, 41)) and set(outputs) == set(range(3, 10))
    assert statistics.fmean(prompt_lens) == pytest.approx(24, abs=0.6)
    assert statistics.fmean(outputs) == pytest.approx(6, abs=0.15)
    assert all(r.prompt is not None and len(r.prompt.split()) == r.prompt_len for r in trace)


def test_base_fraction_and_no_adapters() -> None:
    trace = generate(TraceConfig(adapters=5, base_fraction=0.25, requests=4000, text=False))
    assert sum(r.adapter is None for r in trace) / 4000 == pytest.approx(0.25, abs=0.03)
    assert all(r.adapter is None for r in generate(TraceConfig(adapters=0, requests=50, text=False)))


def test_same_seed_same_trace_and_aspects_draw_from_separate_streams() -> None:
    config = TraceConfig(adapters=50, alpha=0.5, requests=300, prompt_len=(8, 64), output_len=(8, 64), seed=7)
    assert generate(config) == generate(config)
    other = generate(TraceConfig(**{**config.__dict__, "seed": 8}))
    assert [r.arrival for r in other] != [r.arrival for r in generate(config)]
    # more adapters: the same arrivals, lengths and prompts, only the adapter names change
    wider = generate(TraceConfig(**{**config.__dict__, "adapters": 1000}))
    base = generate(config)
    assert [(r.arrival, r.prompt_len, r.max_new_tokens, r.prompt) for r in wider] == [
        (r.arrival, r.prompt_len, r.max_new_tokens, r.prompt) for r in base
    ]
    assert [r.adapter for r in wider] != [r.adapter for r in base]


def test_jsonl_round_trip_rescaling_and_cli(tmp_path: Path) -> None:
    trace = generate(TraceConfig(adapters=20, base_fraction=0.2, requests=40, prompt_len=(4, 9), seed=3))
    save(trace, tmp_path / "t.jsonl")
    assert load(tmp_path / "t.jsonl") == trace
    save(trace, tmp_path / "lengths.jsonl", with_text=False)
    bare = load(tmp_path / "lengths.jsonl")
    assert all(r.prompt is None for r in bare)
    rebuilt = [prompt_text(r, i) for i, r in enumerate(bare)]
    assert rebuilt == [prompt_text(r, i) for i, r in enumerate(bare)]  # deterministic
    assert [len(p.split()) for p in rebuilt] == [r.prompt_len for r in trace]
    assert offered_rate(scale_to_rate(trace, 123.0)) == pytest.approx(123.0)

    out = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "-m", "loadtests.trace", "--adapters", "5", "--rate", "10", "--duration", "3",
           "--prompt-len", "4", "6", "--output-len", "2", "3", "--alpha", "0.5", "--seed", "1",
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=60, cwd=REPO_ROOT)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) == {"arrival", "adapter", "prompt_len", "max_new_tokens", "prompt"}
    assert all(4 <= r["prompt_len"] <= 6 and 2 <= r["max_new_tokens"] <= 3 for r in rows)
    assert load(out) == generate(TraceConfig(adapters=5, rate=10, duration=3, prompt_len=(4, 6), output_len=(2, 3),
                                             alpha=0.5, seed=1))  # fmt: skip


# ---- driver: statistics -----------------------------------------------------------------------------------------
def test_percentile_interpolates_like_numpy() -> None:
    np = pytest.importorskip("numpy")
    values = [0.3, 5.0, 1.0, 2.5, 9.0, 0.1, 4.4]
    for q in (0, 10, 50, 90, 99, 100):
        assert driver_report.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert driver_report.percentile([], 50) is None


def test_summarize_computes_ttft_tpot_throughput_slo_and_errors() -> None:
    good = driver.RequestRecord(0, "a0000", 0.0, 5, sent=0.0, end=1.0, status=200, output_tokens=5,
                                token_times=[0.2, 0.4, 0.6, 0.8, 1.0])  # fmt: skip
    slow = driver.RequestRecord(1, None, 0.5, 3, sent=0.5, end=4.0, status=200, output_tokens=3,
                                token_times=[2.0, 2.5, 3.0])  # fmt: skip
    refused = driver.RequestRecord(2, "zz", 1.0, 3, sent=1.0, end=1.1, status=404, error="not_found")
    broken = driver.RequestRecord(3, "a0000", 1.0, 3, sent=1.0, end=2.0, status=200, error="stream:timeout",
                                  output_tokens=1, token_times=[0.5])  # fmt: skip
    s = driver_report.summarize([good, slow, refused, broken], elapsed=4.0, slo_ttft=1.0)
    assert (s["requests"], s["ok"], s["errors"]) == (4, 2, {"404": 1, "stream:timeout": 1})
    assert s["throughput_rps"] == pytest.approx(0.5) and s["output_tps"] == pytest.approx(8 / 4)
    assert s["ttft_s"]["p50"] == pytest.approx(1.1) and s["ttft_s"]["mean"] == pytest.approx(1.1)
    assert good.tpot == pytest.approx(0.2) and slow.tpot == pytest.approx(0.5)
    assert s["tpot_s"]["mean"] == pytest.approx(0.35)
    assert s["itl_s"]["p50"] == pytest.approx(0.2)
    assert s["slo_attainment"] == pytest.approx(0.25)  # only `good`: failures count against the SLO
    assert s["latency_s"]["p99"] == pytest.approx(1.0 + 2.5 * 0.99)


def _replay_canned(api: str, body: str) -> driver.RequestRecord:
    """One request through ``driver.send`` against a canned SSE answer (no server)."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def go() -> driver.RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            record = driver.RequestRecord(0, "a0000", 0.0, 3)
            return await driver.send(client, driver.Target("http://x", api), record, "p", 0.0,  # type: ignore[arg-type]
                                     TraceRequest(0.0, "a0000", 1, 3))  # fmt: skip

    return asyncio.run(go())


def test_stream_parsing_usage_flushes_and_broken_streams() -> None:
    ev = "data: {}\n\n".format
    done = "data: [DONE]\n\n"
    tok = '{{"id": "r", "token": {{"id": {}, "text": "x"}}}}'.format
    final = '{"id": "r", "finish_reason": "length", "usage": {"prompt_tokens": 4, "completion_tokens": 3}}'
    flush = (
        '{"id": "r", "token": {"id": -1, "text": "!"}, "finish_reason": "stop", '
        '"usage": {"prompt_tokens": 4, "completion_tokens": 2}}'
    )
    rec = _replay_canned("generate", ev(tok(5)) + ev(tok(6)) + ev(tok(7)) + ev(final) + done)
    assert (rec.ok, rec.output_tokens, len(rec.token_times), rec.prompt_tokens) == (True, 3, 3, 4)
    rec = _replay_canned("generate", ev(tok(5)) + ev(tok(6)) + ev(flush) + done)  # a text flush is no token
    assert (rec.ok, rec.output_tokens, len(rec.token_times), rec.finish_reason) == (True, 2, 2, "stop")
    timeout = '{"id": "r", "finish_reason": "timeout", "usage": {"prompt_tokens": 4, "completion_tokens": 1}}'
    assert _replay_canned("generate", ev(tok(5)) + ev(timeout) + done).error == "stream:timeout"
    assert _replay_canned("generate", ev(tok(5))).error == "stream:incomplete"  # closed before [DONE]
    # OpenAI: vLLM's usage chunk (empty choices) gives the token count; without it every chunk counts as one
    chunk = '{{"choices": [{{"index": 0, "text": "ab", "finish_reason": {}}}]}}'.format
    usage = '{"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}'
    rec = _replay_canned("openai", ev(chunk("null")) + ev(chunk('"length"')) + ev(usage) + done)
    assert (rec.ok, rec.output_tokens, len(rec.token_times), rec.finish_reason) == (True, 5, 2, "length")
    rec = _replay_canned("openai", ev(chunk("null")) + ev(chunk('"stop"')) + done)
    assert (rec.ok, rec.output_tokens, rec.finish_reason) == (True, 2, "stop")
    error = '{"error": {"type": "timeout", "message": "late"}}'
    assert _replay_canned("openai", ev(chunk("null")) + ev(error) + done).error == "stream:timeout"


def test_plot_is_written_with_matplotlib_and_skipped_without(tmp_path: Path, monkeypatch) -> None:
    summary = driver_report.summarize([driver.RequestRecord(0, None, 0.0, 2, end=1.0, status=200, output_tokens=2,
                                                     token_times=[0.1, 0.3])], 1.0, 1.0)  # fmt: skip
    summaries = [{"rate": r, **summary} for r in (1.0, 2.0)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed (restored after the test)
    assert driver_report.plot_sweep(summaries, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert driver_report.plot_sweep(summaries, tmp_path / "sweep.png") is True
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- driver against a real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtest")
    startup = root / "startup"
    startup.mkdir()
    for i, folder in enumerate(tiny_adapters("llama")[:2]):
        (startup / f"a{i:04d}").symlink_to(folder, target_is_directory=True)
    proc = ServerProcess(tiny_model_dir("llama"), root / "data", "--gpu-slots", "2", "--max-seq-len", "256",
                         "--max-batch-size", "8", "--startup-adapters", str(startup))  # fmt: skip
    with proc:
        yield proc


TRACE = generate(TraceConfig(adapters=2, popularity="uniform", rate=40.0, requests=16, prompt_len=(4, 12),
                             output_len=(2, 8), base_fraction=0.25, seed=3))  # fmt: skip


def _check_sane(summary: dict, records: list[driver.RequestRecord]) -> None:
    assert summary["requests"] == summary["ok"] == len(TRACE) and summary["errors"] == {}
    assert summary["duration_s"] >= TRACE[-1].arrival
    assert summary["throughput_rps"] == pytest.approx(len(TRACE) / summary["duration_s"])
    assert summary["output_tokens"] == sum(r.output_tokens for r in records)
    assert summary["slo_attainment"] == 1.0
    for key in ("ttft_s", "tpot_s", "latency_s"):
        d = summary[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"] < 60
    for rec, req in zip(records, TRACE, strict=True):
        assert rec.adapter == req.adapter and rec.ok
        assert rec.sent >= req.arrival - 1e-3  # open loop: never early
        assert rec.token_times == sorted(rec.token_times) and 0 < rec.token_times[0] <= rec.latency
        assert rec.prompt_tokens is None or rec.prompt_tokens >= req.prompt_len  # each word is at least a token


def test_driver_replays_a_trace_through_generate(server) -> None:
    summary, records = driver.run(TRACE, driver.Target(server.url, "generate"), slo_ttft=60.0)
    _check_sane(summary, records)
    # ignore_eos: every request makes exactly its tokens, one SSE token event each
    assert [r.output_tokens for r in records] == [r.max_new_tokens for r in TRACE]
    assert [len(r.token_times) for r in records] == [r.max_new_tokens for r in TRACE]
    assert summary["output_tokens"] == sum(r.max_new_tokens for r in TRACE)
    assert all(r.finish_reason == "length" and r.prompt_tokens for r in records)
    states = {a["name"]: a["state"] for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]}
    assert states == {"a0000": "gpu", "a0001": "gpu"}  # the requests really ran on the adapters


def test_driver_replays_a_trace_through_openai_completions(server) -> None:
    summary, records = driver.run(TRACE, driver.Target(server.url, "openai"), slo_ttft=60.0)
    _check_sane(summary, records)
    for rec, req in zip(records, TRACE, strict=True):
        assert 1 <= rec.output_tokens == len(rec.token_times) <= req.max_new_tokens
        assert rec.finish_reason in ("length", "stop")
        if rec.finish_reason == "length":
            assert rec.output_tokens == req.max_new_tokens


def test_driver_counts_errors_by_status(server) -> None:
    trace = [TraceRequest(0.0, "missing", 4, 2), TraceRequest(0.01, None, 4, 2), TraceRequest(0.02, None, 4, 400)]
    summary, records = driver.run(trace, driver.Target(server.url, "generate"), slo_ttft=60.0)
    assert summary["errors"] == {"404": 1, "400": 1}  # unknown adapter; prompt + 400 tokens > --max-seq-len 256
    assert summary["ok"] == 1 and summary["slo_attainment"] == pytest.approx(1 / 3)
    assert records[0].error == "not_found" and records[2].error == "invalid_request"


def test_driver_cli_sweep_writes_json(server, tmp_path: Path) -> None:
    save(TRACE[:6], tmp_path / "t.jsonl")
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["--trace", str(tmp_path / "t.jsonl"), "--url", server.url, "--api", "openai", "--rates", "20,80",
            "--json", str(out), "--plot", str(plot), "--slo-ttft", "60"]  # fmt: skip
    assert driver.main(args) == 0
    result = json.loads(out.read_text())
    assert [s["rate"] for s in result["sweep"]] == [20.0, 80.0]
    assert all(s["ok"] == 6 and s["offered_rate"] == pytest.approx(s["rate"]) for s in result["sweep"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not plot.exists()
    else:
        assert plot.read_bytes()[:4] == b"\x89PNG"


# ---- bench_adapters helpers -------------------------------------------------------------------------------------
def test_bench_adapters_are_what_peft_saves_and_what_the_server_reads(tiny_model_dir, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loadtests.bench_adapters import ALPHA, RANK, TARGETS
    from loadtests.common.factories import target_shapes, write_random_adapter
    from server.model.lora_model import LoraModel

    base_dir = tiny_model_dir("llama")
    write_random_adapter(tmp_path / "a", target_shapes(base_dir, TARGETS), 1, RANK, ALPHA)
    ours = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    peft_keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(get_peft_model(base, config)).items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == peft_keys
    assert all(bool(t.abs().sum() > 0) for t in ours.values())  # non-zero B: the adapter changes outputs
    weights = LoraModel(AutoModelForCausalLM.from_pretrained(base_dir), 1, RANK).read_adapter(tmp_path / "a")
    assert weights.rank == RANK and len(weights.layers) == len(peft_keys) // 2


def test_bench_doc_section_replaces_only_between_markers(tmp_path: Path) -> None:
    from loadtests.common.docs_section import markers, write_section

    begin, end = markers("bench")
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    write_section(doc, "bench", "first")
    assert doc.read_text() == f"# Benchmarks\n\nkept\n\n{begin}\nfirst\n{end}\n"
    doc.write_text(doc.read_text() + "after\n")
    write_section(doc, "bench", "second\nrun")
    assert doc.read_text() == f"# Benchmarks\n\nkept\n\n{begin}\nsecond\nrun\n{end}\nafter\n"
    fresh = tmp_path / "r.md"
    write_section(fresh, "soak", "figures", heading="## Soak test")
    assert fresh.read_text() == "## Soak test\n\n<!-- soak:begin -->\nfigures\n<!-- soak:end -->\n"


def test_bench_engine_features_mode_quick(tiny_model_dir, tmp_path: Path) -> None:
    """The engine benchmark's logprobs + JSON-schema mode runs end to end and counts what it was asked to mix."""
    out = tmp_path / "features.json"
    cmd = [sys.executable, "-m", "loadtests.bench_engine", "--base-model", str(tiny_model_dir("llama")),
           "--requests", "6", "--adapters", "2", "--rank", "4", "--batch", "4", "--slots", "2", "--rounds", "1",
           "--logprobs-share", "0.5", "--json-share", "0.2", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, timeout=300, capture_output=True)
    figures = json.loads(out.read_text())
    assert figures["logprobs_requests"] == 3 and figures["json_requests"] == 1
    assert all(v > 0 for v in figures["tokens_per_second"].values())


def _run_json(module: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{module}.json"
    cmd = [sys.executable, "-m", f"loadtests.{module}", *args, "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, timeout=300, capture_output=True)
    return json.loads(out.read_text())


def test_bench_prefix_cache_quick(tiny_model_dir, tmp_path: Path) -> None:
    """Both contenders run the same trace; the cache serves the shared system prompts and changes no output."""
    figures = _run_json("bench_prefix_cache", tmp_path, "--base-model", str(tiny_model_dir("llama")), "--requests",
                        "8", "--adapters", "2", "--system-tokens", "40", "--clients", "2", "--rank", "4")  # fmt: skip
    assert figures["cache-off"]["cached_prompt_share"] == 0 < figures["cache-on"]["cached_prompt_share"]
    assert figures["ratios"]["identical_outputs"] == 1.0


def test_bench_adapter_pool_quick(tiny_model_dir, tmp_path: Path) -> None:
    """Adapters at their own rank: more of them fit the budget than max-rank slots would hold."""
    figures = _run_json("bench_adapter_pool", tmp_path, "--base-model", str(tiny_model_dir("llama")),
                        "--budget-mib", "0.5", "--adapters", "12", "--ranks", "2,4,16", "--max-rank", "16")  # fmt: skip
    assert figures["resident_true_rank"] > figures["resident_padded_to_max_rank"] >= 1
    assert figures["rows_used"] <= figures["pool_rows"]


def test_bench_batch_sizes_quick(tiny_model_dir, tmp_path: Path) -> None:
    figures = _run_json("bench_batch_sizes", tmp_path, "--base-model", str(tiny_model_dir("llama")), "--caps", "2,4",
                        "--requests", "6", "--adapters", "2", "--rank", "4")  # fmt: skip
    assert set(figures) == {"args", "2", "4"} and all(figures[c]["tokens_per_s"] > 0 for c in ("2", "4"))
