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
                                        --rounds 2 --no-adapter-affinity]
The two engine contenders run ``--rounds`` times each in ABBA order and keep their fastest round.
Targets on a 2-core CPU with SmolLM2-135M: ours >= 0.85x ours-base, >= 2x peft-mixed, >= 8x peft-per-request.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loadtests.common.factories import save_peft_adapters
from loadtests.common.timing import interleave
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling_params import SamplingParams
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel


@dataclass(frozen=True)
class Req:
    adapter: int
    prompt: list[int]
    new_tokens: int


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


def run_ours(engine: Engine, trace: list[Req], names: list[str] | None) -> tuple[float, int]:
    start = time.perf_counter()
    handles = [
        engine.submit(r.prompt, names[r.adapter] if names else None,
                      SamplingParams(max_new_tokens=r.new_tokens, ignore_eos=True))
        for r in trace
    ]  # fmt: skip
    while engine.has_work():
        if engine.step() == 0:
            time.sleep(0.001)
    elapsed = time.perf_counter() - start
    made = sum(h.result().completion_tokens for h in handles)
    assert made == sum(r.new_tokens for r in trace)
    return elapsed, made


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    base_dir = args.base_model or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, names = save_peft_adapters(base_dir, Path(tmp), args.adapters, args.rank)
        peft_model.generation_config.eos_token_id = None
        model = LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), args.slots, args.rank)
        folders = {name: Path(tmp) / name for name in names}
        config = EngineConfig(
            max_batch_size=args.batch, max_seq_len=256 + 128, max_tokens_per_step=args.max_tokens_per_step,
            cpu_slots=args.adapters, adapter_affinity=args.adapter_affinity,
        )  # fmt: skip
        trace = make_trace(args.requests, args.adapters, args.exponent, model.model.config.vocab_size, args.seed)

        def on_engine(adapter_names: list[str] | None) -> Callable[[], tuple[float, int]]:
            def run() -> tuple[float, int]:
                engine = Engine(model, tokenizer, lambda name: folders[name], config)
                # adapters are read from disk inside the timed run (a fresh engine has empty slots)
                secs, made = run_ours(engine, trace, adapter_names)
                engine.shutdown()
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
    if args.json:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, "tokens_per_second": tps, "ratios": ratios,
                   "round_seconds": rounds, "ours_over_ours_base_per_round": paired}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
