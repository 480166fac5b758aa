"""Shared system prompts: time to first token and throughput with prefix caching on and off, in-process, one run.

Workload (the one issue 15 names): A adapters (default 32, rank 16 on the attention projections), each with its own
system prompt of S tokens (default 200); every request is its adapter's system prompt plus a user part of 16..64
tokens, asks for 16..32 tokens (EOS ignored), and its adapter is drawn with power-law popularity. A closed loop of C
clients (default 16) keeps C requests in flight: each finished request is replaced by the next one of the trace, so
time to first token measures the prefill each request needs, not a queue. Contenders, the same trace, ABBA rounds:
  cache-on   the engine with prefix caching (the default)
  cache-off  the same engine with ``prefix_caching=False``
Printed: median and p90 TTFT, tokens/s, prompt tokens served from the cache, and how many requests produced the
same tokens in both (greedy; a cached prefix must not change the answer). Target: median TTFT cache-off/cache-on
>= 2.

Usage: python -m loadtests.bench_prefix_cache [--requests 256 --adapters 32 --system-tokens 200 --clients 16
                                              --rounds 1 --base-model DIR --json out.json]
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from loadtests.common.factories import target_shapes, write_random_adapters
from server.engine.engine import Engine, EngineConfig
from server.engine.handle import RequestHandle
from server.engine.sampling_params import SamplingParams
from server.engine.stats import FinishedRecord
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Req:
    adapter: int
    prompt: list[int]
    new_tokens: int


def make_trace(n: int, adapters: int, system_tokens: int, vocab: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, vocab) for _ in range(system_tokens)] for _ in range(adapters)]
    weights = [(i + 1) ** -1.0 for i in range(adapters)]
    trace = []
    for _ in range(n):
        a = rng.choices(range(adapters), weights)[0]
        user = [rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))]
        trace.append(Req(a, systems[a] + user, rng.randint(16, 32)))
    return trace


@dataclass
class Outcome:
    seconds: float
    tokens: int
    ttft: list[float]
    outputs: list[list[int]]
    hit_tokens: int
    prompt_tokens: int


def run_closed_loop(engine: Engine, trace: list[Req], names: list[str], clients: int) -> Outcome:
    """Keep ``clients`` requests in flight until the trace is done; step the engine on this thread."""
    records: list[FinishedRecord] = []
    engine.on_finish.append(records.append)
    handles: list[RequestHandle] = []
    hits_before = engine.blocks.hit_tokens
    start = time.perf_counter()

    def submit_next() -> None:
        r = trace[len(handles)]
        params = SamplingParams(max_new_tokens=r.new_tokens, ignore_eos=True)
        handles.append(engine.submit(r.prompt, names[r.adapter], params))

    for _ in range(min(clients, len(trace))):
        submit_next()
    while engine.has_work() or len(handles) < len(trace):
        done_before = len(records)
        if engine.step() == 0:
            time.sleep(0.0005)
        for _ in range(len(records) - done_before):
            if len(handles) < len(trace):
                submit_next()
    seconds = time.perf_counter() - start
    engine.on_finish.remove(records.append)
    results = [h.result() for h in handles]
    failed = [res.error for res in results if res.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
    return Outcome(
        seconds=seconds,
        tokens=sum(res.completion_tokens for res in results),
        ttft=[rec.ttft_seconds for rec in records if rec.ttft_seconds is not None],
        outputs=[list(res.token_ids) for res in results],
        hit_tokens=engine.blocks.hit_tokens - hits_before,
        prompt_tokens=sum(len(r.prompt) for r in trace),
    )


def summary(outcome: Outcome) -> dict[str, float]:
    ttft = sorted(outcome.ttft)
    return {
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p90_ms": 1000 * ttft[int(0.9 * (len(ttft) - 1))],
        "tokens_per_s": outcome.tokens / outcome.seconds,
        "seconds": outcome.seconds,
        "cached_prompt_share": outcome.hit_tokens / outcome.prompt_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_prefix_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of each contender (ABBA order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    base_dir = args.base_model or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"sys-{i}" for i in range(args.adapters)]
        write_random_adapters(Path(tmp), names, target_shapes(base_dir, ATTENTION), args.rank, 2.0 * args.rank)
        model = LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), args.adapters, args.rank)
        trace = make_trace(args.requests, args.adapters, args.system_tokens, model.model.config.vocab_size, args.seed)

        def engine(prefix_caching: bool) -> Engine:
            config = EngineConfig(max_batch_size=args.batch, max_seq_len=args.system_tokens + 64 + 32,
                                  cpu_slots=args.adapters, prefix_caching=prefix_caching)  # fmt: skip
            return Engine(model, tokenizer, lambda name: Path(tmp) / name, config)

        runs: dict[str, list[Outcome]] = {"cache-on": [], "cache-off": []}
        order = ["cache-on", "cache-off", "cache-off", "cache-on"] * args.rounds
        for label in order[: 2 * args.rounds]:
            runs[label].append(run_closed_loop(engine(label == "cache-on"), trace, names, args.clients))
    best = {label: min(outs, key=lambda o: statistics.median(o.ttft)) for label, outs in runs.items()}
    figures = {label: summary(o) for label, o in best.items()}
    same = sum(a == b for a, b in zip(best["cache-on"].outputs, best["cache-off"].outputs, strict=True))
    on, off = figures["cache-on"], figures["cache-off"]
    figures["ratios"] = {
        "ttft_p50_off_over_on": off["ttft_p50_ms"] / on["ttft_p50_ms"],
        "tokens_per_s_on_over_off": on["tokens_per_s"] / off["tokens_per_s"],
        "identical_outputs": same / len(trace),
    }
    print(f"{'contender':10} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'tokens/s':>9} {'cached prompt':>14}")
    for label in ("cache-on", "cache-off"):
        f = figures[label]
        print(f"{label:10} {f['ttft_p50_ms']:12.1f} {f['ttft_p90_ms']:12.1f} {f['tokens_per_s']:9.1f} "
              f"{f['cached_prompt_share']:14.1%}")  # fmt: skip
    r = figures["ratios"]
    print(f"median TTFT off/on = {r['ttft_p50_off_over_on']:.2f} (target >= 2); tokens/s on/off = "
          f"{r['tokens_per_s_on_over_off']:.2f}; identical greedy outputs: {same}/{len(trace)}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))


if __name__ == "__main__":
    main()
