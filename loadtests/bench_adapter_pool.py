"""How many adapters stay resident in an adapter-memory budget: each at its own rank (now) against slots padded to
``--max-rank`` (before), measured on the real model and engine.

Writes A adapters (default 60; ranks 8, 16, 64 in turn; rank 64 is ``--max-rank``) on the attention projections of
the embedded model, builds an engine whose adapter pool is ``--budget-mib`` (default 200) with 256 slots, and runs one
single-token request on each adapter in turn, so the slot cache loads them in that order and evicts by LRU when the
pool is full. Reported: adapters resident at the end, rows and bytes used, and what the padded layout held in the same
bytes (``budget // (max_rank x bytes per rank row)``: every slot reserved max-rank rows in every wrapped layer).

Usage: python -m loadtests.bench_adapter_pool [--budget-mib 200 --adapters 60 --ranks 8,16,64 --json out.json]
"""

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

from loadtests.common.factories import target_shapes, write_random_adapter
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling_params import SamplingParams
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_adapter_pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--budget-mib", type=float, default=200.0)
    parser.add_argument("--adapters", type=int, default=60)
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    budget = int(args.budget_mib * 2**20)

    base_dir = args.base_model or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    shapes = target_shapes(base_dir, ATTENTION)
    with tempfile.TemporaryDirectory() as tmp:
        rank_of = {f"r{i}": ranks[i % len(ranks)] for i in range(args.adapters)}
        for i, (name, rank) in enumerate(rank_of.items()):
            write_random_adapter(Path(tmp) / name, shapes, seed=100 + i, rank=rank, alpha=2.0 * rank)
        model = LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), 256, args.max_rank,
                          pack_weights=False, adapter_cache_bytes=budget)  # fmt: skip
        engine = Engine(model, tokenizer, lambda name: Path(tmp) / name,
                        EngineConfig(max_batch_size=4, max_seq_len=64, cpu_slots=0))  # fmt: skip
        for name in rank_of:
            handle = engine.submit([5, 6, 7], name, SamplingParams(max_new_tokens=1))
            while engine.has_work():
                engine.step()
            result = handle.result()
            if result.error:
                raise RuntimeError(f"{name}: {result.error}")
        usage = engine.slot_cache.usage()
        resident = [name for name in rank_of if engine.adapter_tier(name) == "gpu"]
    padded = budget // (args.max_rank * model.bytes_per_row)
    figures = {
        "bytes_per_rank_row": model.bytes_per_row,
        "pool_rows": usage.rows_total,
        "resident_true_rank": len(resident),
        "resident_by_rank": dict(sorted(Counter(rank_of[n] for n in resident).items())),
        "rows_used": usage.rows_used,
        "bytes_used_mib": usage.bytes_used / 2**20,
        "resident_padded_to_max_rank": padded,
        "ratio": len(resident) / max(padded, 1),
    }
    print(f"budget {args.budget_mib:.0f} MiB = {usage.rows_total} rank rows of {model.bytes_per_row / 2**20:.2f} MiB; "
          f"ranks {args.ranks} in turn, {args.adapters} adapters loaded once each")  # fmt: skip
    print(f"resident at their own rank: {len(resident)} {figures['resident_by_rank']} ({usage.rows_used} rows used)")
    print(f"padded to max rank {args.max_rank}: {padded}; ratio {figures['ratio']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))


if __name__ == "__main__":
    main()
