"""Engine throughput by ``--max-batch-size``, in-process, one trace, one run: where the paged KV cache's cap on
running rows is best on this machine (the default of ``--max-batch-size`` comes from this table).

Workload: N requests (default 384) over A adapters (default 32, rank 16 on all seven projections, power-law
popularity), prompts uniform in 16..128 tokens, outputs uniform in 16..64 (EOS ignored), all submitted at once, so
the running batch fills to the cap. Each cap runs the same trace on a fresh engine over the same model; the KV pool
is the default (2 GiB on CPU), so large caps are bounded by blocks, not by a reservation.

Usage: python -m loadtests.bench_batch_sizes [--caps 32,64,128,256 --requests 384 --adapters 32 --json out.json]
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from loadtests.bench_engine import Req, run_ours
from loadtests.common.factories import save_peft_adapters
from server.engine.engine import Engine, EngineConfig
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel


def make_trace(n: int, adapters: int, vocab: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    weights = [(i + 1) ** -1.0 for i in range(adapters)]
    return [
        Req(
            rng.choices(range(adapters), weights)[0],
            [rng.randrange(3, vocab) for _ in range(rng.randint(16, 128))],
            rng.randint(16, 64),
        )  # fmt: skip
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_batch_sizes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--caps", default="32,64,128,256")
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    caps = [int(c) for c in args.caps.split(",")]

    base_dir = args.base_model or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, names = save_peft_adapters(base_dir, Path(tmp), args.adapters, args.rank)
        model = LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), args.adapters, args.rank)
        trace = make_trace(args.requests, args.adapters, model.model.config.vocab_size, args.seed)
        for cap in caps:
            config = EngineConfig(max_batch_size=cap, max_seq_len=256, max_tokens_per_step=max(2048, cap),
                                  cpu_slots=args.adapters)  # fmt: skip
            engine = Engine(model, tokenizer, lambda name: Path(tmp) / name, config)
            seconds, tokens, _ = run_ours(engine, trace, names)
            figures[str(cap)] = {"tokens_per_s": tokens / seconds, "seconds": seconds}
            print(f"max batch {cap:4}: {tokens / seconds:7.1f} tokens/s ({seconds:.1f} s)", flush=True)
    best = max(figures, key=lambda c: figures[c]["tokens_per_s"])
    print(f"best cap: {best}; each cap / cap {caps[0]}: "
          + ", ".join(f"{c}: {figures[c]['tokens_per_s'] / figures[str(caps[0])]['tokens_per_s']:.2f}"
                      for c in figures))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))


if __name__ == "__main__":
    main()
