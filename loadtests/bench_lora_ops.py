"""The LoRA add alone, every op side by side on the same step shapes: what one engine step's LoRA work costs.

For each step shape (which adapter slot each token uses), every contender op adds the LoRA delta of all wrapped
projections of a SmolLM2-135M-shaped model (30 layers x q, k, v, o, gate, up, down; default rank 16) into fresh
base outputs. Each projection has its own random stacked weights for all slots, as in the server, so the weights
of a step's adapters come from memory the way they do in a real step. Contenders run interleaved, best of
``--repeats`` rounds; the script checks that every op's result equals the reference op's first.

Usage: python -m loadtests.bench_lora_ops [--ops grouped,native --rank 16 --slots 32 --layers 30 --repeats 5
                                          --json out.json]
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from loadtests.common.timing import interleave
from server.kernels.mapping import TokenSlotMapping
from server.kernels.protocol import LoraWeights
from server.kernels.select import LORA_OPS, select_op

# SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536, 30 layers; (in, out) of each wrapped projection.
LAYER_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def step_shapes() -> dict[str, list[int]]:
    """Slot of each token for the step shapes the engine runs (decode tokens first, each part sorted by slot)."""

    def spread(rows: int, adapters: int) -> list[int]:
        return sorted(1 + i % adapters for i in range(rows))

    return {
        "decode 32 rows, 4 adapters": spread(32, 4),
        "decode 32 rows, 1 adapter": [1] * 32,
        "decode 32 rows, 32 adapters": spread(32, 32),
        "decode 24 rows on 4 adapters + 8 base": spread(24, 4) + [0] * 8,
        "prefill 256 tokens, 1 adapter": [3] * 256,
        "decode 32 (4 adapters) + 2 prompts of 200": spread(32, 4) + [5] * 200 + [6] * 200,
        "prefill 2048 tokens, 8 prompts": [slot for k in range(8) for slot in [1 + k] * 256],
    }


def one_step(op, layers: list[LoraWeights], xs: list[torch.Tensor], ys: list[torch.Tensor], meta) -> Callable[[], None]:
    """One engine step's LoRA work with ``op``: the add of every wrapped projection of every layer (its per-step
    metadata, ``op.prepare``, built once outside the timed region)."""

    def run() -> None:
        for weights, x, y in zip(layers, xs, ys, strict=True):
            op.add(y, x, weights, meta)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_lora_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="grouped,native", help="comma-separated ops from kernels.select.LORA_OPS")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = args.ops.split(",")
    for name in names:
        select_op(name, torch.device("cpu"))  # a clear error for an op this machine cannot run

    torch.manual_seed(0)
    layers = []
    for d_in, d_out in LAYER_SHAPES * args.layers:
        a = torch.randn(args.slots + 1, args.rank, d_in) * 0.05
        b = torch.randn(args.slots + 1, args.rank, d_out) * 0.05
        a[0], b[0] = 0, 0
        scales = torch.rand(args.slots + 1)
        scales[0] = 0
        ranks = [0] + [args.rank] * args.slots
        layers.append(LoraWeights.build(a, b, scales, ranks))

    results: dict[str, dict[str, float]] = {}
    print(f"{args.layers} layers x {len(LAYER_SHAPES)} projections, rank {args.rank}, {args.slots} slots, "
          f"{torch.get_num_threads()} threads; ms per step, best of {args.repeats}")  # fmt: skip
    for label, slots in step_shapes().items():
        mapping = TokenSlotMapping.build(slots)
        metas = {name: LORA_OPS[name].prepare(mapping) for name in ["reference", *names]}
        xs = [torch.randn(len(slots), d_in) for d_in, _ in LAYER_SHAPES * args.layers]
        ys = [torch.randn(len(slots), d_out) for _, d_out in LAYER_SHAPES * args.layers]
        for i in (0, 5, 6):  # every op equals the reference before it is timed
            expected = ys[i].clone()
            LORA_OPS["reference"].add(expected, xs[i], layers[i], metas["reference"])
            for name in names:
                got = ys[i].clone()
                LORA_OPS[name].add(got, xs[i], layers[i], metas[name])
                torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
        steps = {name: one_step(LORA_OPS[name], layers, xs, ys, metas[name]) for name in names}
        timed = interleave(steps, args.repeats)
        best = {name: min(seconds) for name, seconds in timed.seconds.items()}
        results[label] = {name: secs * 1e3 for name, secs in best.items()}
        first = names[0]
        cells = "  ".join(f"{name} {secs * 1e3:7.2f}" for name, secs in best.items())
        ratios = "  ".join(f"{first}/{name} {best[first] / best[name]:.2f}" for name in names[1:])
        print(f"  {label:<44} {cells}  {ratios}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "ms": results}, indent=2))


if __name__ == "__main__":
    main()
