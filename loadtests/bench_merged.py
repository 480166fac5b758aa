"""The merged fast path on a one-hot workload: engine throughput on the base model, unmerged, and merged, in one run.

Workload: N requests (default 64), ``--dominant-share`` (0.9) of them on one adapter and the rest spread evenly over
``--others`` (3) other adapters, all rank ``--rank`` on the seven projections (saved by PEFT on the real base model),
prompt lengths uniform in 8..256, output lengths uniform in 8..128 (EOS ignored), all submitted at once, greedy.
Contenders, each an engine over its own copy of the base model (a merge rewrites that copy's weights):
  base-only   the same requests on the base model (the ceiling)
  unmerged    each request on its adapter, ``merge_dominant`` off (the default server)
  merged      each request on its adapter, ``merge_dominant`` on (``--patience`` steps before merging)
Admission is in arrival order (no adapter affinity), so the three run the same steps. The engines run side by side,
interleaved step by step (one step of each in turn, the order rotating), each timed by the sum of its own steps: the
shared machine's drift (tens of percent over minutes, see docs/benchmarks.md) then hits all three alike, where whole
runs one after the other differ by more than the effect. Work on the engines' background threads (adapter reads, the
merge's weight packing: about 1 s of one core) is in no step's time and slows the others' steps as much as its own.
``--rounds`` repeats the whole run. Then a decode-step replay (``--replay-iterations``, 0 for none): one decode step
of ``--batch`` rows, the dominant adapter's share of them as in the trace, run the three ways back to back through one
``ModelRunner`` (merge swapped in and out around its call), many times, order rotating: best and median per variant.
Prints tokens/s side by side, the ratios, the merge counters and the merge/unmerge time, and how many requests got the
same greedy tokens merged as unmerged (float32: expected all; bfloat16 rounding may flip near-ties).

Usage: python -m loadtests.bench_merged [--requests 64 --others 3 --dominant-share 0.9 --rank 16 --batch 32
                                        --rounds 1 --patience 16 --threads 1 --json out.json]
(``--threads 1`` on a shared 2-core machine: two OpenMP threads per process collapse when other processes load it.)
Target (issue 16): merged within 3% of base-only (merged / base-only >= 0.97).
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loadtests.bench_engine import Req
from loadtests.common.factories import save_peft_adapters
from server.engine.engine import Engine, EngineConfig
from server.engine.merge_policy import MergePolicyConfig
from server.engine.model_runner import ModelRunner, SequenceChunk
from server.engine.sampling_params import SamplingParams
from server.kernels.slots import BASE_SLOT
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.model.merge import apply_merge, correction_weights, merge_adapter, prepare_merge, unmerge_adapter

CONTENDERS = ("base-only", "unmerged", "merged")


def one_hot_trace(n: int, others: int, share: float, vocab: int, seed: int) -> list[Req]:
    """``round(share * n)`` requests on adapter 0, the rest on adapters 1..others in turn, shuffled (seeded)."""
    rng = random.Random(seed)
    dominant = round(share * n)
    adapters = [0] * dominant + [1 + i % others for i in range(n - dominant)]
    rng.shuffle(adapters)
    return [Req(a, [rng.randrange(3, vocab) for _ in range(rng.randint(8, 256))], rng.randint(8, 128))
            for a in adapters]  # fmt: skip


def run_side_by_side(engines: dict[str, Engine], trace: list[Req], names: list[str]) -> dict[str, tuple[float, list]]:
    """Submit the trace to every engine (base-only: on the base model), then step them in turn until all are done;
    name -> (seconds in its own steps, the token ids of each request)."""
    handles = {
        name: [engine.submit(r.prompt, None if name == "base-only" else names[r.adapter],
                             SamplingParams(max_new_tokens=r.new_tokens, ignore_eos=True)) for r in trace]
        for name, engine in engines.items()
    }  # fmt: skip
    busy = dict.fromkeys(engines, 0.0)
    order = list(engines)
    while any(engine.has_work() for engine in engines.values()):
        ran = False
        for name in order:
            engine = engines[name]
            if engine.has_work():
                start = time.perf_counter()
                ran |= engine.step() > 0
                busy[name] += time.perf_counter() - start
        order = order[1:] + order[:1]
        if not ran:
            time.sleep(0.001)  # adapter reads in flight on the loader threads
    out = {}
    for name, hs in handles.items():
        results = [h.result() for h in hs]
        failed = [res.error for res in results if res.error]
        if failed:
            raise RuntimeError(f"{name}: {len(failed)} requests failed, the first: {failed[0]}")
        out[name] = (busy[name], [res.token_ids for res in results])
    return out


def merge_timing(model: LoraModel, folder: Path, repeats: int = 3) -> tuple[float, float, int]:
    """Best seconds of folding the adapter in ``folder`` into the base weights on this thread (prepare and apply) and
    of unfolding it, and the bytes held aside while merged."""
    weights = model.read_adapter(folder)
    merges, unmerges, held = [], [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        merged = merge_adapter(model, weights)
        middle = time.perf_counter()
        held = merged.nbytes
        unmerge_adapter(model, merged)
        merges.append(middle - start)
        unmerges.append(time.perf_counter() - middle)
    return min(merges), min(unmerges), held


def replay_decode(base_dir: Path, folders: list[Path], rank: int, rows: int, others: int, iterations: int,
                  context: int = 150) -> dict[str, list[float]]:  # fmt: skip
    """One decode step of ``rows`` sequences (``others`` of them on other adapters, one each in turn; the rest on
    adapter 0) run three ways back to back through one ``ModelRunner``, the order rotating: on the base slot, each
    row on its adapter, and with adapter 0 merged (its rows on the base slot, the others on their corrections; the
    merge is swapped in and out around the call). Variant -> seconds of each call, the first 4 rounds dropped."""
    model = LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), 2 * len(folders), rank,
                      default_pool_rows=4 * len(folders) * rank)  # fmt: skip
    weights = [model.read_adapter(folder) for folder in folders]
    offset = 0
    for slot, w in enumerate([*weights, *(correction_weights(w, weights[0]) for w in weights[1:])], start=1):
        model.write_slot(slot, w, offset)  # slots 1..n: the adapters; n+1..: the corrections of adapters 1..n-1
        offset += model.rows_of(w)
    prepared = prepare_merge(model, weights[0])
    blocks = -(-(context + 1) // 16)
    runner = ModelRunner(model, rows * blocks, 16, blocks * 16, rows, max(rows, 256))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, model.model.config.vocab_size) for _ in range(context + 1)] for _ in range(rows)]
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(rows)]
    own = [2 + i % (len(folders) - 1) if i < others else 1 for i in range(rows)]
    for i in range(rows):  # the context, unmerged
        runner.run([SequenceChunk(tables[i], own[i], prompts[i][:context], 0, needs_logits=True)])
    remap = {1: BASE_SLOT, **{slot: slot + len(folders) - 1 for slot in range(2, len(folders) + 1)}}
    variants = {"base-only": [BASE_SLOT] * rows, "unmerged": own, "merged": [remap[s] for s in own]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for i in range(iterations + 4):
        for name in order:
            chunks = [SequenceChunk(tables[k], variants[name][k], prompts[k][context:], context, needs_logits=True)
                      for k in range(rows)]  # fmt: skip
            merged = apply_merge(model, prepared) if name == "merged" else None
            start = time.perf_counter()
            runner.run(chunks)
            if i >= 4:
                times[name].append(time.perf_counter() - start)
            if merged is not None:
                unmerge_adapter(model, merged)
        order = order[1:] + order[:1]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_merged", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--others", type=int, default=3, help="adapters sharing the requests not on the dominant one")
    parser.add_argument("--dominant-share", type=float, default=0.9)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="the engine's max batch size")
    parser.add_argument("--rounds", type=int, default=1, help="side-by-side runs")
    parser.add_argument("--patience", type=int, default=16, help="steps of dominance before merging (and back)")
    parser.add_argument("--merge-share", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--replay-iterations", type=int, default=40,
                        help="rounds of the decode-step replay (0: none)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.others < 1 or not 0 < args.dominant_share <= 1:
        parser.error("--others must be >= 1 and --dominant-share in (0, 1]")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    base_dir = args.base_model or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    policy = MergePolicyConfig(merge_share=args.merge_share, unmerge_share=min(0.5, args.merge_share),
                               patience=args.patience)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        _, names = save_peft_adapters(base_dir, Path(tmp), 1 + args.others, args.rank)
        folders = {name: Path(tmp) / name for name in names}
        slots = 1 + args.others + 8  # room for the corrections beside the adapters
        models = {name: LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), slots, args.rank)
                  for name in CONTENDERS}  # fmt: skip
        trace = one_hot_trace(args.requests, args.others, args.dominant_share,
                              models["merged"].model.config.vocab_size, args.seed)  # fmt: skip
        rounds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        stats, same = [], 0
        for _ in range(args.rounds):
            engines = {
                name: Engine(models[name], tokenizer, lambda adapter: folders[adapter],
                             EngineConfig(max_batch_size=args.batch, max_seq_len=256 + 128, cpu_slots=slots,
                                          adapter_affinity=False,  # admission in arrival order: the same steps
                                          merge_dominant=name == "merged", merge_policy=policy))
                for name in CONTENDERS
            }  # fmt: skip
            out = run_side_by_side(engines, trace, names)
            merge = engines["merged"].merge
            assert merge is not None
            stats.append(dict(vars(merge.stats)))
            for engine in engines.values():
                engine.shutdown()  # the merged one unmerges
            for name in CONTENDERS:
                rounds[name].append(out[name][0])
            same = sum(a == b for a, b in zip(out["merged"][1], out["unmerged"][1], strict=True))
        merge_s, unmerge_s, held = merge_timing(models["merged"], folders[names[0]])
        del models, engines
        others_rows = round(args.batch * (1 - args.dominant_share))
        replay = {}
        if args.replay_iterations > 0:
            replay = replay_decode(base_dir, [folders[n] for n in names], args.rank, args.batch, others_rows,
                                   args.replay_iterations)  # fmt: skip

    made = sum(r.new_tokens for r in trace)
    tps = {name: made / min(rounds[name]) for name in CONTENDERS}
    dominant = sum(r.adapter == 0 for r in trace)
    print(f"{len(trace)} requests, {dominant} on the dominant adapter, {len(trace) - dominant} over {args.others} "
          f"others; rank {args.rank} on 7 projections, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"policy {policy}")  # fmt: skip
    for name in CONTENDERS:
        print(f"  {name:<10} {made:6d} tokens, best {min(rounds[name]):7.1f} s in its steps = {tps[name]:7.1f} "
              f"tokens/s  (rounds: {', '.join(f'{t:.1f}' for t in rounds[name])} s)")  # fmt: skip
    ratios = {
        "merged_over_base_only": tps["merged"] / tps["base-only"],
        "unmerged_over_base_only": tps["unmerged"] / tps["base-only"],
        "merged_over_unmerged": tps["merged"] / tps["unmerged"],
    }
    paired = [b / m for m, b in zip(rounds["merged"], rounds["base-only"], strict=True)]
    print(f"merged / base-only   = {ratios['merged_over_base_only']:.3f}  (target >= 0.97; each round: "
          f"{', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f})")  # fmt: skip
    print(f"unmerged / base-only = {ratios['unmerged_over_base_only']:.3f}")
    print(f"merged / unmerged    = {ratios['merged_over_unmerged']:.3f}")
    for i, s in enumerate(stats):
        print(
            f"merged round {i + 1}: {s['merges']} merges, {s['unmerges']} unmerges ({s['forced_unmerges']} forced),"
            f" {s['merged_steps']} merged steps, {s['merge_seconds']:.3f} s swapping weights on the engine thread"
        )
    print(
        f"merge of one adapter (rank {args.rank}, 7 projections, every layer) on one thread, prepared and applied: "
        f"{merge_s * 1e3:.0f} ms; unmerge {unmerge_s * 1e3:.2f} ms; {held / 2**20:.0f} MiB held aside while merged"
    )
    print(f"greedy tokens, merged = unmerged: {same} of {len(trace)} requests (last round)")
    best = {name: min(t) for name, t in replay.items()}
    if replay:
        print(f"decode-step replay, {args.batch} rows ({others_rows} on other adapters), {args.replay_iterations} "
              f"rounds, best / median ms: " + ", ".join(f"{n} {best[n] * 1e3:.1f} / {statistics.median(t) * 1e3:.1f}"
                                                     for n, t in replay.items()))  # fmt: skip
        print(f"  throughput ratio (best): merged / base-only = {best['base-only'] / best['merged']:.3f}, unmerged / "
              f"base-only = {best['base-only'] / best['unmerged']:.3f}")  # fmt: skip
    if args.json:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, "tokens_per_second": tps, "ratios": ratios,
                   "round_seconds": rounds, "merged_over_base_only_per_round": paired, "merge_stats": stats,
                   "merge_seconds": merge_s, "unmerge_seconds": unmerge_s, "held_bytes": held,
                   "same_tokens": same, "replay_decode_seconds": replay}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
