"""Engine throughput with a share of DoRA adapters vs the same workload on plain LoRA, side by side in one run.

The trace of ``bench_engine`` (power-law popularity over A adapters, prompts 8..256, outputs 8..128 tokens, all
submitted at once, EOS ignored). Contenders:
  all-plain   every adapter is a plain LoRA adapter (rank ``--rank`` on all seven projections)
  with-dora   the same adapters, some turned into DoRA twins (same A, B and config, plus a magnitude vector):
              ``--dora-of requests`` (default) the most requested first until ``--dora-fraction`` of the requests
              are on DoRA; ``--dora-of adapters`` that fraction of the adapters, spread evenly over popularity
Each contender has its own model and engine, and the two engines take steps in turn (which goes first alternates
by round), each timing its own steps: the drift of a shared machine (several-fold over minutes when other work
lands on its two cores) then hits both within the same seconds, which whole runs one after the other did not
survive. Throughput is tokens over the seconds spent in each engine's steps, which hold the slot writes (DoRA's
norms are computed there) and the forward passes; adapter files are read on each engine's reader thread, outside.
Every round starts both engines empty (cold slots).

Usage: python -m loadtests.bench_dora [--requests 200 --adapters 32 --dora-fraction 0.3 --dora-of requests
                                       --rounds 2]
Target: with-dora >= 0.9x all-plain.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loadtests.bench_engine import Req, make_trace
from loadtests.common.dora import dora_twin
from loadtests.common.factories import save_peft_adapters
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling_params import SamplingParams
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

CONTENDERS = ("all-plain", "with-dora")


def choose_dora(trace: list[Req], fraction: float, of: str, adapters: int) -> set[int]:
    """Adapters to serve as DoRA. ``of == "requests"``: the most requested first, until ``fraction`` of the requests
    are on them (one that would overshoot the fraction by more than it undershoots is left out). ``"adapters"``:
    ``round(fraction * adapters)`` of them, every ``1 / fraction``-th in popularity order (the most popular first)."""
    if of == "adapters":
        return {int(j / fraction) for j in range(round(fraction * adapters))} if fraction else set()
    counts = Counter(r.adapter for r in trace)
    goal = fraction * len(trace)
    chosen: set[int] = set()
    covered = 0
    for adapter, n in counts.most_common():
        if abs(covered + n - goal) < abs(covered - goal):
            chosen.add(adapter)
            covered += n
    return chosen


def side_by_side(engines: dict[str, Engine], trace: list[Req], names: list[str]) -> dict[str, tuple[float, int]]:
    """Submit the whole trace to every engine, then step them in turn until all are done: per engine (seconds in
    its steps, tokens made)."""
    handles = {
        name: [e.submit(r.prompt, names[r.adapter], SamplingParams(max_new_tokens=r.new_tokens, ignore_eos=True))
               for r in trace]
        for name, e in engines.items()
    }  # fmt: skip
    busy = dict.fromkeys(engines, 0.0)
    while any(e.has_work() for e in engines.values()):
        waiting = True
        for name, e in engines.items():
            if e.has_work():
                start = time.perf_counter()
                waiting &= e.step() == 0
                busy[name] += time.perf_counter() - start
        if waiting:
            time.sleep(0.001)  # both wait for adapter reads
    out = {}
    for name, hs in handles.items():
        results = [h.result() for h in hs]
        failed = [res.error for res in results if res.error]
        if failed:
            raise RuntimeError(f"{name}: {len(failed)} requests failed, the first: {failed[0]}")
        out[name] = (busy[name], sum(res.completion_tokens for res in results))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_dora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dora-fraction", type=float, default=0.3, help="share of DoRA (see --dora-of)")
    parser.add_argument("--dora-of", choices=("requests", "adapters"), default="requests",
                        help="the share is of the requests (on DoRA adapters) or of the adapters")  # fmt: skip
    parser.add_argument("--exponent", type=float, default=1.0, help="power-law popularity exponent")
    parser.add_argument("--batch", type=int, default=32, help="max batch size")
    parser.add_argument("--slots", type=int, default=32, help="accelerator slots for adapters")
    parser.add_argument("--max-tokens-per-step", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2, help="side-by-side runs (who steps first alternates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not 0 <= args.dora_fraction <= 1:
        parser.error("--dora-fraction must be in [0, 1]")

    base_dir = args.base_model or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = EngineConfig(
        max_batch_size=args.batch, max_seq_len=256 + 128, max_tokens_per_step=args.max_tokens_per_step,
        cpu_slots=args.adapters,
    )  # fmt: skip
    rounds: list[dict[str, tuple[float, int]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = save_peft_adapters(base_dir, root / "plain", args.adapters, args.rank)[1]  # (PEFT model not kept)
        models = {name: load_base_model(base_dir, device="cpu", dtype="float32") for name in CONTENDERS}
        trace = make_trace(args.requests, args.adapters, args.exponent, models["all-plain"].config.vocab_size,
                           args.seed)  # fmt: skip
        dora = choose_dora(trace, args.dora_fraction, args.dora_of, args.adapters)
        folders = {name: {a: root / "plain" / a for a in names} for name in CONTENDERS}
        for i in sorted(dora):
            twin = dora_twin(root / "plain" / names[i], root / "dora" / names[i], models["with-dora"], seed=i)
            folders["with-dora"][names[i]] = twin
        # max rank + 1 rows a slot: room for a DoRA adapter's magnitude row, for both contenders alike
        lora = {name: LoraModel(m, args.slots, args.rank, default_pool_rows=args.slots * (args.rank + 1))
                for name, m in models.items()}  # fmt: skip
        for r in range(args.rounds):
            order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
            engines = {name: Engine(lora[name], tokenizer, folders[name].__getitem__, config) for name in order}
            rounds.append(side_by_side(engines, trace, names))
            for e in engines.values():
                e.shutdown()

    expected_tokens = sum(r.new_tokens for r in trace)
    assert all(made == expected_tokens for done in rounds for _, made in done.values())
    seconds = {name: [done[name][0] for done in rounds] for name in CONTENDERS}
    tps = {name: len(rounds) * expected_tokens / sum(seconds[name]) for name in CONTENDERS}
    ratio = tps["with-dora"] / tps["all-plain"]
    per_round = [p / d for p, d in zip(seconds["all-plain"], seconds["with-dora"], strict=True)]
    on_dora = [r for r in trace if r.adapter in dora]
    share_requests = len(on_dora) / len(trace)
    share_tokens = sum(r.new_tokens + len(r.prompt) for r in on_dora) / sum(r.new_tokens + len(r.prompt) for r in trace)
    used = sorted({r.adapter for r in trace})
    print(f"{args.requests} requests, {len(used)} of {args.adapters} adapters used (power law {args.exponent}), rank "
          f"{args.rank}, batch {args.batch}, slots {args.slots}, {torch.get_num_threads()} threads; DoRA: "
          f"{len(dora)} adapters, {share_requests:.0%} of the requests, {share_tokens:.0%} of the tokens")  # fmt: skip
    for name in CONTENDERS:
        print(f"  {name:<10} {tps[name]:7.1f} tokens/s  (seconds in steps per round: "
              f"{', '.join(f'{t:.1f}' for t in seconds[name])})")  # fmt: skip
    print(f"with-dora / all-plain = {ratio:.3f}  (target >= 0.9; per round: "
          f"{', '.join(f'{r:.3f}' for r in per_round)}, median {statistics.median(per_round):.3f})")  # fmt: skip
    if args.json:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, "tokens_per_second": tps,
                   "with_dora_over_all_plain": ratio, "per_round": per_round, "step_seconds": seconds,
                   "dora_adapters": sorted(dora), "dora_share_requests": share_requests,
                   "dora_share_tokens": share_tokens}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
