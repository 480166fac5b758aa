"""End-to-end generation throughput of the engine vs PEFT, in-process, one run, one workload for everyone.

Workload: N requests (default 200) over A adapters (default 32) with power-law popularity, prompt lengths uniform
in 8..256, output lengths uniform in 8..128 (EOS ignored so every contender makes the same tokens), all submitted
at once. Contenders:
  ours             our engine, each request on its adapter
  ours-base        our engine, the same requests on the base model
  peft-per-request PEFT ``generate`` one request at a time, switching adapter (a prefix of the trace)
  peft-mixed       PEFT ``generate(adapter_names=...)`` over static batches of our max batch size (a prefix)
Throughput counts the tokens each request asked for (padding and overshoot in static batches do not count).

Usage: python -m loadtests.bench_engine [--requests 200 --adapters 32 --batch 32 --peft-requests 16 --peft-batches 1
                                        --rounds 2 --no-adapter-affinity --dtype float32|bfloat16|auto]
The two engine contenders run ``--rounds`` times each in ABBA order and keep their fastest round.
Targets on a 2-core CPU with SmolLM2-135M: ours >= 0.85x ours-base, >= 2x peft-mixed, >= 8x peft-per-request.

Features mode (``--logprobs-share 0.25 --json-share 0.1``): the same trace, a share of the requests asking for
``logprobs`` (``--top-logprobs`` alternatives per token) and a disjoint share constrained by a JSON schema (a grammar
compiled once by ``GrammarCompiler`` before timing; each request gets its own matcher). Contenders, ABBA:
  ours-plain       the trace without logprobs or grammars
  ours-features    the trace with them
A grammar ends its request when the JSON is complete, so the JSON requests' lengths are first measured in an untimed
calibration pass and both contenders then ask for exactly those lengths. Target: ours-features >= 0.9x ours-plain.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loadtests.common.factories import save_peft_adapters
from loadtests.common.timing import interleave
from server.engine.engine import Engine, EngineConfig
from server.engine.handle import RequestResult
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from server.engine.structured_output import CompiledGrammar
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

Feature = Literal["", "logprobs", "json"]
# What the JSON requests must produce: a typical extraction schema (nested object, array, enum, bounded integer).
JSON_REQUIRED = ("name", "age", "status", "tags")
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["open", "closed", "pending"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": list(JSON_REQUIRED),
}


@dataclass(frozen=True)
class Req:
    adapter: int
    prompt: list[int]
    new_tokens: int
    feature: Feature = ""  # features mode: what this request asks for beyond plain greedy tokens


def make_trace(n: int, adapters: int, exponent: float, vocab: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    weights = [(i + 1) ** -exponent for i in range(adapters)]
    return [
        Req(
            rng.choices(range(adapters), weights)[0],
            [rng.randrange(3, vocab) for _ in range(rng.randint(8, 256))],
            rng.randint(8, 128),
        )
        for _ in range(n)
    ]


def with_features(trace: list[Req], logprobs_share: float, json_share: float, seed: int) -> list[Req]:
    """The trace with ``json_share`` of its requests (rounded) marked "json" and a disjoint ``logprobs_share``
    marked "logprobs", drawn at random (seeded)."""
    order = list(range(len(trace)))
    random.Random(seed + 1).shuffle(order)
    n_json, n_logprobs = round(json_share * len(trace)), round(logprobs_share * len(trace))
    marks: dict[int, Feature] = {i: "json" for i in order[:n_json]}
    marks.update({i: "logprobs" for i in order[n_json : n_json + n_logprobs]})
    return [replace(r, feature=marks.get(i, "")) for i, r in enumerate(trace)]


Submission = tuple[SamplingParams, CompiledGrammar | None]


def plain(r: Req) -> Submission:
    return SamplingParams(max_new_tokens=r.new_tokens, ignore_eos=True), None


def featured(top_logprobs: int, grammar: CompiledGrammar | None) -> Callable[[Req], Submission]:
    """Requests as features mode submits them: logprobs rows ask for ``top_logprobs`` alternatives; JSON rows run
    under ``grammar`` and stop when it is complete (EOS is what a complete grammar allows)."""

    def submission(r: Req) -> Submission:
        if r.feature == "logprobs":
            return SamplingParams(max_new_tokens=r.new_tokens, ignore_eos=True, logprobs=top_logprobs), None
        if r.feature == "json":
            return SamplingParams(max_new_tokens=r.new_tokens), grammar
        return plain(r)

    return submission


def run_ours(engine: Engine, trace: list[Req], names: list[str] | None,
             submission: Callable[[Req], Submission] = plain) -> tuple[float, int, list[RequestResult]]:  # fmt: skip
    """Submit the whole trace at once and step the engine until it is done: (seconds, tokens made, results)."""
    start = time.perf_counter()
    handles = []
    for r in trace:
        params, grammar = submission(r)
        handles.append(engine.submit(r.prompt, names[r.adapter] if names else None, params, grammar=grammar))
    while engine.has_work():
        if engine.step() == 0:
            time.sleep(0.001)
    elapsed = time.perf_counter() - start
    results = [h.result() for h in handles]
    failed = [res.error for res in results if res.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
    return elapsed, sum(res.completion_tokens for res in results), results


def run_peft_per_request(peft_model, trace: list[Req], names: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.inference_mode():
        for r in trace:
            peft_model.set_adapter(names[r.adapter])
            peft_model.generate(
                input_ids=torch.tensor([r.prompt]), max_new_tokens=r.new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
    return time.perf_counter() - start, sum(r.new_tokens for r in trace)


def run_peft_mixed(peft_model, trace: list[Req], names: list[str], batch: int) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(trace), batch):
            group = trace[i : i + batch]
            width = max(len(r.prompt) for r in group)
            ids = torch.zeros((len(group), width), dtype=torch.int64)
            mask = torch.zeros((len(group), width), dtype=torch.int64)
            for j, r in enumerate(group):  # left padding, as generate expects for decoder-only models
                ids[j, width - len(r.prompt) :] = torch.tensor(r.prompt)
                mask[j, width - len(r.prompt) :] = 1
            peft_model.generate(
                input_ids=ids, attention_mask=mask, adapter_names=[names[r.adapter] for r in group],
                max_new_tokens=max(r.new_tokens for r in group), do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
    return time.perf_counter() - start, sum(r.new_tokens for r in trace)


def compile_json_grammar(engine: Engine, tokenizer: PreTrainedTokenizerBase) -> tuple[CompiledGrammar, float]:
    """JSON_SCHEMA compiled as the API compiles it for ``engine`` (its logits width and EOS set), and the seconds it
    took (the tokenizer's one-time setup included); exits with a clear message when this checkout has no structured
    output."""
    try:
        from server.engine.structured_output import GrammarCompiler, StructuredOutputSpec
    except ImportError as exc:
        raise SystemExit(f"--json-share needs structured output (server.engine.structured_output.GrammarCompiler), "
                         f"which this checkout lacks: {exc}. Run with --json-share 0.") from None  # fmt: skip
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_ids)
    grammar = compiler.compile(StructuredOutputSpec("json_schema", json.dumps(JSON_SCHEMA)))
    return grammar, time.perf_counter() - start


def check_features(trace: list[Req], results: list[RequestResult], top_logprobs: int) -> int:
    """Fail unless every logprobs request got one entry of ``top_logprobs`` alternatives per token (a feature
    silently skipped would flatter the ratio); the number of JSON requests that completed with an object holding
    the schema's required keys (the grammar's own checks are tested elsewhere; this only confirms it ran)."""
    parsed = 0
    for r, res in zip(trace, results, strict=True):
        if r.feature == "logprobs" and (len(res.logprobs) != res.completion_tokens
                                        or any(len(lp.top) != top_logprobs for lp in res.logprobs)):  # fmt: skip
            raise RuntimeError(f"{res.request_id} asked for logprobs={top_logprobs} and got {len(res.logprobs)} "
                               f"entries for {res.completion_tokens} tokens")  # fmt: skip
        if r.feature == "json" and res.finish_reason in (FinishReason.EOS, FinishReason.STOP):
            try:
                value = json.loads(res.text)
            except ValueError:
                continue
            parsed += isinstance(value, dict) and set(JSON_REQUIRED) <= value.keys()
    return parsed


def features_mode(args: argparse.Namespace, make_engine: Callable[[], Engine], names: list[str],
                  trace: list[Req], tokenizer: PreTrainedTokenizerBase) -> dict:  # fmt: skip
    """ours-plain against ours-features (ABBA rounds) on the trace with logprobs and JSON requests mixed in."""
    trace = with_features(trace, args.logprobs_share, args.json_share, args.seed)
    json_rows = [r for r in trace if r.feature == "json"]
    grammar, compile_s, calibration_s, parsed, lengths = None, 0.0, 0.0, 0, {}
    if json_rows:  # untimed: compile once, then measure how long each JSON request runs under its grammar
        engine = make_engine()
        grammar, compile_s = compile_json_grammar(engine, tokenizer)
        calibration_s, _, results = run_ours(engine, json_rows, names, featured(args.top_logprobs, grammar))
        engine.shutdown()
        parsed = check_features(json_rows, results, args.top_logprobs)
        lengths = {id(r): max(1, res.completion_tokens) for r, res in zip(json_rows, results, strict=True)}
    submission = featured(args.top_logprobs, grammar)
    trace = [replace(r, new_tokens=lengths[id(r)]) if id(r) in lengths else r for r in trace]
    checked: list[int] = []

    def contender(sub: Callable[[Req], Submission]) -> Callable[[], tuple[float, int]]:
        def run() -> tuple[float, int]:
            engine = make_engine()
            secs, made, results = run_ours(engine, trace, names, sub)
            engine.shutdown()
            if sub is submission:
                checked.append(check_features(trace, results, args.top_logprobs))
            elif made != sum(r.new_tokens for r in trace):
                raise RuntimeError(f"ours-plain made {made} tokens, not the {sum(r.new_tokens for r in trace)} asked")
            return secs, made

        return run

    timed = interleave({"ours-plain": contender(plain), "ours-features": contender(submission)}, args.rounds,
                       alternate=True)  # fmt: skip
    rounds = {name: [secs for secs, _ in runs] for name, runs in timed.results.items()}
    tps = {name: timed.last(name)[1] / min(rounds[name]) for name in rounds}
    n_logprobs = sum(r.feature == "logprobs" for r in trace)
    print(f"{len(trace)} requests: {n_logprobs} ask for logprobs (top {args.top_logprobs}), {len(json_rows)} for a "
          f"JSON schema (grammar compiled once in {compile_s:.2f} s; calibration: {parsed} of {len(json_rows)} "
          f"complete and parse, {sum(lengths.values())} tokens in {calibration_s:.1f} s); "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for name in rounds:
        print(f"  {name:<14} {timed.last(name)[1]:6d} tokens, best {min(rounds[name]):7.1f} s = {tps[name]:7.1f} "
              f"tokens/s  (rounds: {', '.join(f'{t:.1f}' for t in rounds[name])} s)")  # fmt: skip
    paired = [p / f for p, f in zip(rounds["ours-plain"], rounds["ours-features"], strict=True)]
    ratio = tps["ours-features"] / tps["ours-plain"]
    print(f"ours-features / ours-plain = {ratio:.3f}  (target >= 0.9; within each round: "
          f"{', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f})")  # fmt: skip
    return {"tokens_per_second": tps, "ratio_features_over_plain": ratio, "round_seconds": rounds,
            "ratio_per_round": paired, "grammar_compile_seconds": compile_s, "logprobs_requests": n_logprobs,
            "json_requests": len(json_rows), "json_parsed_calibration": parsed,
            "json_parsed_timed": checked}  # fmt: skip


def classic_mode(args: argparse.Namespace, make_engine: Callable[[], Engine], peft_model, names: list[str],
                 trace: list[Req]) -> dict:  # fmt: skip
    """ours and ours-base (ABBA rounds), then the PEFT baselines on prefixes of the trace."""

    def on_engine(adapter_names: list[str] | None) -> Callable[[], tuple[float, int]]:
        def run() -> tuple[float, int]:
            engine = make_engine()  # adapters are read from disk inside the timed run (a fresh engine: empty slots)
            secs, made, _ = run_ours(engine, trace, adapter_names)
            engine.shutdown()
            assert made == sum(r.new_tokens for r in trace)
            return secs, made

        return run

    # This machine's speed drifts by tens of percent over minutes, so the two engine contenders alternate in
    # ABBA order (ours, base, base, ours, ...) and each keeps its fastest round (timed by run_ours: without
    # building and shutting down the engine).
    timed = interleave({"ours": on_engine(names), "ours-base": on_engine(None)}, args.rounds, alternate=True)
    rounds = {name: [secs for secs, _ in runs] for name, runs in timed.results.items()}
    results = {name: (min(rounds[name]), timed.last(name)[1]) for name in rounds}
    results["peft-per-request"] = run_peft_per_request(peft_model, trace[: args.peft_requests], names)
    results["peft-mixed"] = run_peft_mixed(peft_model, trace[: args.peft_batches * args.batch], names, args.batch)

    tps = {k: made / secs for k, (secs, made) in results.items()}
    used = sorted({r.adapter for r in trace})
    print(f"{args.requests} requests, {len(used)} of {args.adapters} adapters used (power law {args.exponent}), "
          f"rank {args.rank}, batch {args.batch}, slots {args.slots}, {torch.get_num_threads()} threads, "
          f"adapter affinity {'on' if args.adapter_affinity else 'off'}")  # fmt: skip
    for k, (secs, made) in results.items():
        every = f"  (rounds: {', '.join(f'{t:.1f}' for t in rounds[k])} s)" if k in rounds else ""
        print(f"  {k:<17} {made:6d} tokens in {secs:7.1f} s = {tps[k]:7.1f} tokens/s{every}")
    ratios = {
        "ours_over_ours_base": tps["ours"] / tps["ours-base"],
        "ours_over_peft_mixed": tps["ours"] / tps["peft-mixed"],
        "ours_over_peft_per_request": tps["ours"] / tps["peft-per-request"],
    }
    # The same ratio within each ABBA round (the two contenders back to back): how much of it is drift.
    paired = [base / ours for ours, base in zip(rounds["ours"], rounds["ours-base"], strict=True)]
    print(f"ours / ours-base        = {ratios['ours_over_ours_base']:.2f}  (target >= 0.85; within each round: "
          f"{', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f})")  # fmt: skip
    print(f"ours / peft-mixed       = {ratios['ours_over_peft_mixed']:.2f}  (target >= 2)")
    print(f"ours / peft-per-request = {ratios['ours_over_peft_per_request']:.2f}  (target >= 8)")
    return {"tokens_per_second": tps, "ratios": ratios, "round_seconds": rounds,
            "ours_over_ours_base_per_round": paired}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--exponent", type=float, default=1.0, help="power-law popularity exponent")
    parser.add_argument("--batch", type=int, default=32, help="our max batch size, and PEFT's static batch size")
    parser.add_argument("--slots", type=int, default=32, help="accelerator slots for adapters")
    parser.add_argument("--max-tokens-per-step", type=int, default=2048)
    parser.add_argument("--peft-requests", type=int, default=16, help="trace prefix for PEFT per-request")
    parser.add_argument("--peft-batches", type=int, default=1, help="static batches for PEFT mixed")
    parser.add_argument("--adapter-affinity", action=argparse.BooleanOptionalAction, default=True,
                        help="admit requests whose adapter is already running first (the engine's default)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each engine contender (ABBA order)")
    parser.add_argument("--logprobs-share", type=float, default=0.0,
                        help="features mode: share of requests asking for logprobs (e.g. 0.25)")
    parser.add_argument("--top-logprobs", type=int, default=5, help="features mode: alternatives per logprobs token")
    parser.add_argument("--json-share", type=float, default=0.0,
                        help="features mode: share of requests constrained by a JSON schema (e.g. 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                        help="our engine's compute dtype (PEFT stays float32)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (0 <= args.logprobs_share and 0 <= args.json_share and args.logprobs_share + args.json_share <= 1):
        parser.error("--logprobs-share and --json-share must be >= 0 and sum to at most 1")

    base_dir = args.base_model or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, names = save_peft_adapters(base_dir, Path(tmp), args.adapters, args.rank)
        peft_model.generation_config.eos_token_id = None
        model = LoraModel(load_base_model(base_dir, device="cpu", dtype=args.dtype), args.slots, args.rank)
        folders = {name: Path(tmp) / name for name in names}
        config = EngineConfig(
            max_batch_size=args.batch, max_seq_len=256 + 128, max_tokens_per_step=args.max_tokens_per_step,
            cpu_slots=args.adapters, adapter_affinity=args.adapter_affinity,
        )  # fmt: skip
        trace = make_trace(args.requests, args.adapters, args.exponent, model.model.config.vocab_size, args.seed)

        def make_engine() -> Engine:
            return Engine(model, tokenizer, lambda name: folders[name], config)

        if args.logprobs_share or args.json_share:
            figures = features_mode(args, make_engine, names, trace, tokenizer)
        else:
            figures = classic_mode(args, make_engine, peft_model, names, trace)
    if args.json:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, **figures}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
