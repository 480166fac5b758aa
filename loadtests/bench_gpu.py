"""The LoRA path on a GPU: a Llama-3-8B-shaped model with random weights (nothing is downloaded), in one run.

Decode mode (default), through ``ModelRunner`` (the engine's model runner), greedy, EOS never checked: every row
gets a ``--prompt``-token prompt in one prefill pass, then ``--new-tokens`` tokens one decode step at a time.
Contenders, on the same model, KV cache and token ids, interleaved round by round (medians over rounds):
  plain        the base model with the LoRA wrappers swapped out (the floor)
  base         our wrapped model, every row on the base slot
  1-adapter    every row on adapter 1                                  (for each op in --ops)
  N-adapters   row i on adapter i % N: min(batch, N) distinct per step  (for each op in --ops)
Printed per batch size: tokens/s, the ratio to plain, and the time added per output token (decode step time minus
plain's: every row gets one token per step). Also the bytes a decode step must read (base weights, adapters).

Micro mode (``--micro``): one LoRA add per layer shape (q, k/v, o, gate/up, down) for a decode step (one token per
row, row i on adapter i % N), a decode step on one adapter, and a prefill (``--prefill-rows`` rows of --prompt
tokens, one adapter each): time per call of every op, next to the base linear of that shape.

Usage (CUDA, bfloat16; 100 adapters of rank 16 on q,k,v,o,gate,up,down):
  python -m loadtests.bench_gpu [--batch 32 100 --adapters 100 --rank 16 --prompt 128 --new-tokens 128]
  python -m loadtests.bench_gpu --micro
  python -m loadtests.bench_gpu --tiny [--micro]     # 2 layers, hidden 256: a smoke test that runs on CPU
Targets (issue 5): N-adapters >= 0.9x plain tokens/s, and < 2 ms added per output token.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from loadtests.common.timing import interleave
from server.engine.model_runner import ModelRunner, SequenceChunk  # noqa: E402
from server.kernels.mapping import TokenSlotMapping  # noqa: E402
from server.kernels.protocol import LoraWeights  # noqa: E402
from server.kernels.select import LORA_OPS  # noqa: E402
from server.kernels.triton.ops import interpreting  # noqa: E402
from server.model.lora_model import LoraModel  # noqa: E402

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
BLOCK = 16  # KV block size of the benchmark runner
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 1024}  # fmt: skip


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A frozen random Llama of ``shape``, built directly on ``device`` in ``dtype`` (no CPU copy, no download)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def load_random_adapters(lora: LoraModel, count: int, rank: int, seed: int = 0) -> None:
    """Random rank-``rank`` adapters in slots 1..count on every wrapped layer, written as an adapter load does."""
    g = torch.Generator(lora.device).manual_seed(seed)
    for layer in lora.layers.values():
        for slot in range(1, count + 1):
            a = torch.randn(rank, layer.in_features, generator=g, device=lora.device, dtype=lora.dtype)
            b = torch.randn(layer.out_features, rank, generator=g, device=lora.device, dtype=lora.dtype)
            layer.write_slot(slot, a / layer.in_features**0.5, b * 0.02, 2.0)


@contextmanager
def unwrapped(lora: LoraModel) -> Iterator[None]:
    """The plain base model: every BatchedLoraLinear swapped back to its frozen nn.Linear inside the block."""
    swaps = [(lora.model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], layer)
             for name, layer in lora.layers.items()]  # fmt: skip
    for parent, child, layer in swaps:
        setattr(parent, child, layer.base)
    try:
        yield
    finally:
        for parent, child, layer in swaps:
            setattr(parent, child, layer)


def use_op(lora: LoraModel, name: str) -> None:
    """Switch the model to op ``name``: it prepares each step's metadata and every layer adds with it."""
    lora.op = LORA_OPS[name]
    for layer in lora.layers.values():
        layer.op = lora.op


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(runner: ModelRunner, slots: list[int], prompts: list[list[int]], new_tokens: int):
    """Prefill every row, then decode; returns (prefill s, mean decode step s, first-token logits [rows, vocab])."""
    device = runner.device
    sync(device)
    t0 = time.perf_counter()
    per = runner.max_len // BLOCK + 1  # blocks of one row: row i owns blocks i*per .. (i+1)*per - 1
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(slots))]
    chunks = [SequenceChunk(tables[i], s, p, 0, True) for i, (s, p) in enumerate(zip(slots, prompts, strict=True))]
    logits = runner.run(chunks).sample
    tokens = logits.argmax(-1).tolist()  # a host sync per step, as the engine's sampling has
    prefill = time.perf_counter() - t0
    first = logits
    start = len(prompts[0])
    t0 = time.perf_counter()
    for step in range(new_tokens - 1):
        chunks = [SequenceChunk(tables[i], s, [tokens[i]], start + step, True) for i, s in enumerate(slots)]
        tokens = runner.run(chunks).sample.argmax(-1).tolist()
    return prefill, (time.perf_counter() - t0) / max(new_tokens - 1, 1), first


def bench_decode(lora: LoraModel, args: argparse.Namespace, ops: list[str]) -> dict[str, Any]:
    rows, max_len = max(args.batch), args.prompt + args.new_tokens + 1
    runner = ModelRunner(lora, rows * (max_len // BLOCK + 1), BLOCK, max_len, rows)
    vocab = runner.vocab_size
    g = torch.Generator().manual_seed(1)
    results: dict[str, Any] = {"bytes": step_bytes(lora, args.rank), "batches": {}}
    for batch in args.batch:
        prompts = torch.randint(3, vocab, (batch, args.prompt), generator=g).tolist()
        spread = sorted(1 + i % args.adapters for i in range(batch))  # the runner groups rows by slot anyway
        contenders: dict[str, Callable[[], tuple[float, float, torch.Tensor]]] = {}
        contenders["plain"] = lambda p=prompts, b=batch: _plain(lora, runner, [0] * b, p, args.new_tokens)
        contenders["base"] = lambda p=prompts, b=batch: generate(runner, [0] * b, p, args.new_tokens)
        for op in ops:
            for label, slots in ((f"1-adapter/{op}", [1] * batch), (f"{args.adapters}-adapters/{op}", spread)):
                contenders[label] = lambda o=op, s=slots, p=prompts: _with_op(lora, o, runner, s, p, args.new_tokens)
        firsts: dict[str, torch.Tensor] = {}  # each contender's first-token logits, from its latest run
        # one warm-up round (Triton compiles, cuBLAS picks kernels); each run times its own prefill and decode steps
        runs = {name: _keeping_first(fn, firsts, name) for name, fn in contenders.items()}
        timed = interleave(runs, args.rounds, warmup=1)
        results["batches"][batch] = _figures(batch, min(batch, args.adapters), timed.results, firsts)
    return results


def _keeping_first(fn: Callable[[], tuple[float, float, torch.Tensor]], firsts: dict[str, torch.Tensor],
                   name: str) -> Callable[[], tuple[float, float]]:  # fmt: skip
    """``fn`` returning (prefill s, decode step s), its first-token logits put in ``firsts[name]``."""

    def run() -> tuple[float, float]:
        prefill, step, firsts[name] = fn()
        return prefill, step

    return run


def _plain(lora, runner, slots, prompts, new_tokens):
    with unwrapped(lora):
        return generate(runner, slots, prompts, new_tokens)


def _with_op(lora, op, runner, slots, prompts, new_tokens):
    use_op(lora, op)
    return generate(runner, slots, prompts, new_tokens)


def _figures(batch: int, distinct: int, rounds: dict, firsts: dict) -> dict[str, Any]:
    step = {name: statistics.median(s for _, s in v) for name, v in rounds.items()}
    prefill = {name: statistics.median(p for p, _ in v) for name, v in rounds.items()}
    plain = step["plain"]
    names = list(step)
    diffs = {f"{n} vs plain": float((firsts[n] - firsts["plain"]).abs().max()) for n in names if n != "plain"}
    by_kind: dict[str, list[str]] = {}  # the same rows and adapters under each op: their logits should agree
    for n in (n for n in names if "/" in n):
        by_kind.setdefault(n.split("/")[0], []).append(n)
    for group in by_kind.values():
        for other in group[1:]:
            diffs[f"{other} vs {group[0]}"] = float((firsts[other] - firsts[group[0]]).abs().max())
    return {
        "distinct_adapters_per_step": distinct,
        "decode_step_ms": {n: 1000 * s for n, s in step.items()},
        "prefill_ms": {n: 1000 * p for n, p in prefill.items()},
        "tokens_per_second": {n: batch / s for n, s in step.items()},
        "ratio_to_plain": {n: plain / s for n, s in step.items()},
        "added_ms_per_output_token": {n: 1000 * (s - plain) for n, s in step.items()},
        "max_abs_first_logit_diff": diffs,
    }


def step_bytes(lora: LoraModel, rank: int) -> dict[str, float]:
    """Bytes one decode step must read: base weights (the embedding table only by rows), one adapter's A and B."""
    elem = torch.finfo(lora.dtype).bits // 8
    embed = lora.model.get_input_embeddings().weight.numel()
    base = (sum(p.numel() for p in lora.model.parameters()) - embed) * elem
    adapter = sum(rank * (layer.in_features + layer.out_features) for layer in lora.layers.values()) * elem
    return {"base_weights": base, "per_adapter": adapter}


def print_decode(results: dict[str, Any], args: argparse.Namespace) -> None:
    base, per = results["bytes"]["base_weights"], results["bytes"]["per_adapter"]
    print(f"decode: prompt {args.prompt}, {args.new_tokens} new tokens, {args.adapters} adapters of rank {args.rank}; "
          f"a step reads {base / 1e9:.2f} GB of base weights + {per / 1e6:.1f} MB per distinct adapter")  # fmt: skip
    for batch, fig in results["batches"].items():
        distinct = fig["distinct_adapters_per_step"]
        floor = base / (base + distinct * per)
        print(f"\nbatch {batch} ({distinct} distinct adapters per step; if a step were bound by reading weights, "
              f"the best ratio would be {floor:.2f}):")  # fmt: skip
        print(f"  {'contender':<24} {'step ms':>8} {'tokens/s':>9} {'x plain':>8} {'+ms/token':>10} {'prefill ms':>11}")
        for name, ms in fig["decode_step_ms"].items():
            print(f"  {name:<24} {ms:8.2f} {fig['tokens_per_second'][name]:9.1f} {fig['ratio_to_plain'][name]:8.3f} "
                  f"{fig['added_ms_per_output_token'][name]:10.2f} {fig['prefill_ms'][name]:11.1f}")  # fmt: skip
        for name, diff in fig["max_abs_first_logit_diff"].items():
            print(f"  max |first-token logits| diff, {name}: {diff:.3g}")
    print("\ntargets: N-adapters x plain >= 0.9, +ms/token < 2")


def bench_micro(lora: LoraModel, args: argparse.Namespace, ops: list[str]) -> dict[str, Any]:
    """Time of one LoRA add per op for the model's layer shapes, next to the base linear of the shape."""
    cfg, device, dtype = lora.model.config, lora.device, lora.dtype
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, inter), "down": (inter, h)}
    batch = max(args.batch)
    steps = {
        f"decode {batch} rows, {min(batch, args.adapters)} adapters": [1 + i % args.adapters for i in range(batch)],
        f"decode {batch} rows, 1 adapter": [1] * batch,
        f"prefill {args.prefill_rows}x{args.prompt} tokens": [
            1 + r % args.adapters for r in range(args.prefill_rows) for _ in range(args.prompt)
        ],
    }
    g = torch.Generator(device).manual_seed(0)
    out: dict[str, Any] = {}
    for shape_name, (d_in, d_out) in shapes.items():
        s = args.adapters
        a = torch.randn(s + 1, args.rank, d_in, generator=g, device=device, dtype=dtype) / d_in**0.5
        b = torch.randn(s + 1, args.rank, d_out, generator=g, device=device, dtype=dtype) * 0.02
        a[0], b[0] = 0, 0
        scales = torch.full((s + 1,), 2.0, device=device, dtype=dtype)
        scales[0] = 0
        weights = LoraWeights.build(a, b, scales, [0] + [args.rank] * s)
        weights32 = LoraWeights.build(a.float(), b.float(), scales.float(), [0] + [args.rank] * s)
        weight = torch.randn(d_out, d_in, generator=g, device=device, dtype=dtype) / d_in**0.5
        for step_name, slots in steps.items():
            mapping = TokenSlotMapping.build(sorted(slots), device)
            x = torch.randn(len(slots), d_in, generator=g, device=device, dtype=dtype)
            y0 = torch.randn(len(slots), d_out, generator=g, device=device, dtype=dtype)
            ref = y0.float().clone()  # .float() of a float32 tensor is the tensor itself
            reference = LORA_OPS["reference"]
            reference.add(ref, x.float(), weights32, reference.prepare(mapping))
            calls: dict[str, Callable[[], object]] = {"base linear": lambda x=x, w=weight: F.linear(x, w)}
            errors: dict[str, float] = {}
            for op in ops:
                y = y0.clone()
                meta = LORA_OPS[op].prepare(mapping)  # once per step, outside the timed calls
                LORA_OPS[op].add(y, x, weights, meta)
                errors[op] = float((y.float() - ref).abs().max())
                args_ = (y, x, weights, meta)
                calls[op] = lambda fn=LORA_OPS[op].add, args_=args_: fn(*args_)
            timing = _time_calls(calls, device, args.rounds, args.calls)
            adapter_bytes = len({slot for slot, _, _ in mapping.runs}) * args.rank * (d_in + d_out) * a.element_size()
            out[f"{shape_name} {d_in}->{d_out}, {step_name}"] = {
                "tokens": len(slots), "us_per_call": timing, "max_abs_err_vs_fp32_reference": errors,
                "adapter_bytes": adapter_bytes,
            }  # fmt: skip
    return out


def _time_calls(calls: dict[str, Callable[[], object]], device: torch.device, rounds: int, n: int) -> dict:
    """Per call: wall µs (n calls back to back, then a sync) and host µs (enqueueing them); medians of rounds after
    one warm-up round."""

    def n_calls(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return time.perf_counter() - t0  # host time: the calls are queued, not necessarily done

        return run

    timed = interleave({k: n_calls(fn) for k, fn in calls.items()}, rounds, warmup=1, sync=lambda: sync(device))
    return {k: {"wall": statistics.median(timed.seconds[k]) / n * 1e6,
                "host": statistics.median(timed.results[k]) / n * 1e6} for k in calls}  # fmt: skip


def print_micro(results: dict[str, Any]) -> None:
    for case, fig in results.items():
        print(f"\n{case} ({fig['tokens']} tokens, adapters {fig['adapter_bytes'] / 1e6:.1f} MB)")
        for name, t in fig["us_per_call"].items():
            err = fig["max_abs_err_vs_fp32_reference"].get(name)
            gbs = fig["adapter_bytes"] / (t["wall"] * 1e3) if name != "base linear" else float("nan")
            tail = f"  adapter GB/s {gbs:7.1f}  max err {err:.2e}" if err is not None else ""
            print(f"  {name:<14} {t['wall']:9.1f} us/call (host {t['host']:7.1f}){tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 256: a smoke test (CPU is fine)")
    parser.add_argument("--micro", action="store_true", help="time the LoRA op alone on the layer shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="rows per decode step (several: each)")
    parser.add_argument("--adapters", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prefill-rows", type=int, default=8, help="--micro: prompt rows of the prefill case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20, help="--micro: calls per timing")
    parser.add_argument("--ops", default=None, help="comma-separated LoRA ops (default: triton,grouped on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    small = args.tiny and device.type == "cpu"
    args.batch = args.batch or ([4] if small else [32, 100])
    args.adapters = args.adapters or (6 if small else 100)
    args.prompt = args.prompt or (16 if small else 128)
    args.new_tokens = args.new_tokens or (8 if small else 128)
    triton_ok = "triton" in LORA_OPS and (device.type == "cuda" or interpreting())
    default_ops = ["triton", "grouped"] if triton_ok else ["grouped"]
    if args.micro:
        default_ops = [op for op in ("triton", "triton_sgmv", "triton_bgmv") if triton_ok] + ["grouped", "reference"]
    ops = args.ops.split(",") if args.ops else default_ops
    unknown = [op for op in ops if op not in LORA_OPS]
    if unknown:
        parser.error(f"unknown ops {unknown}; available: {sorted(LORA_OPS)}")

    t0 = time.perf_counter()
    model = build_model(TINY if args.tiny else LLAMA3_8B, device, dtype)
    lora = LoraModel(model, num_slots=args.adapters, max_rank=args.rank, op=ops[0])
    load_random_adapters(lora, args.adapters, args.rank)
    sync(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{'tiny' if args.tiny else 'Llama-3-8B-shaped'} model, random weights, {dtype}, {name}; built and "
          f"{args.adapters} adapters loaded in {time.perf_counter() - t0:.1f} s; ops: {', '.join(ops)}")  # fmt: skip
    if args.micro:
        results = bench_micro(lora, args, ops)
        print_micro(results)
    else:
        results = bench_decode(lora, args, ops)
        print_decode(results, args)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        payload = {"device": name, "dtype": str(dtype), "ops": ops, "args": settings, "results": results}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
