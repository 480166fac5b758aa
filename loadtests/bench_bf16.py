"""bfloat16 vs float32 on the CPU, side by side in one process (issue 19): the ops, the engine, and where a decode
step's time goes.

  ops      microseconds per call at SmolLM2-135M's decode shapes (32 rows): the frozen linear (packed for oneDNN
           where this CPU packs the dtype, else ``F.linear``), the LM head, and the LoRA add of 8 rank-16 adapters
           (4 rows each) by the C kernel and by the grouped torch op, in float32 and bfloat16
  engine   tokens/s of the engine on one trace, base model only and 8 adapters mixed, float32 and bfloat16
           (four contenders interleaved round by round, each keeps its best round)
  accuracy bfloat16 vs float32 logits and greedy tokens on the base model, four prompts
  profile  one decode-heavy run per dtype under torch.profiler: milliseconds per engine step in the linears, the LM
           head, the LoRA op, attention, sampling, and the rest (Python, the runner's tensor building, norms, ...)

Usage: python -m loadtests.bench_bf16 [--requests 32 --adapters 8 --rounds 1 --json out.json]
Where the CPU lacks avx512_bf16/AMX (``server.model.dtype_choice``), bfloat16 is a storage format only: expect it
slower than float32 here; the issue's 2x goal is for CPUs with the instructions.
"""

import argparse
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoTokenizer

import server.engine.attention as attention_module
import server.engine.engine as engine_module
from loadtests.bench_engine import Req, make_trace, run_ours
from loadtests.common.factories import save_peft_adapters
from loadtests.common.timing import interleave
from server.engine.engine import Engine, EngineConfig
from server.engine.model_runner import ModelRunner
from server.kernels.grouped import GroupedOp
from server.kernels.mapping import TokenSlotMapping
from server.kernels.native.ops import NativeOp, native_usable
from server.kernels.protocol import LoraOp, LoraWeights
from server.model.dtype_choice import auto_dtype, read_cpu_flags
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.model.packed_linear import PackedLinear, packing_works

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# SmolLM2-135M: (in, out) of q/o, k/v, gate/up, down, and the LM head
SHAPES = {"q,o 576x576": (576, 576), "k,v 576x192": (576, 192), "gate,up 576x1536": (576, 1536),
          "down 1536x576": (1536, 576), "head 576x49152": (576, 49152)}  # fmt: skip


def _median_us(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median us per call of each contender, called in turn call by call (a shared machine's drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats + 2):  # two warm-up calls each
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


@torch.inference_mode()
def bench_ops(rows: int, adapters: int, rank: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median us per call of each contender at each shape."""
    g = torch.Generator().manual_seed(0)
    slots = sorted(1 + i % adapters for i in range(rows))  # the runner sorts decode tokens by slot
    mapping = TokenSlotMapping.build(slots)
    out: dict[str, dict[str, float]] = {}
    for label, (d_in, d_out) in SHAPES.items():
        calls: dict[str, Callable[[], object]] = {}
        x32, w32 = torch.randn(rows, d_in, generator=g), torch.randn(d_out, d_in, generator=g) * 0.05
        a = torch.cat([torch.randn(adapters * rank, d_in, generator=g) * 0.05, torch.zeros(1, d_in)])
        b = torch.cat([torch.randn(adapters * rank, d_out, generator=g) * 0.05, torch.zeros(1, d_out)])
        scales = torch.tensor([0.0] + [2.0] * adapters)
        for name, dtype in DTYPES.items():
            x, w = x32.to(dtype), w32.to(dtype)
            linear = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype)
            linear.weight.copy_(w)
            if packing_works(dtype):
                calls[f"linear {name} (packed)"] = functools.partial(PackedLinear(linear), x)
            else:
                calls[f"linear {name} (F.linear)"] = functools.partial(F.linear, x, w)
            if label.startswith("head"):
                continue
            weights = LoraWeights.build(a.to(dtype), b.to(dtype), scales.to(dtype), [0] + [rank] * adapters,
                                        [0] + [i * rank for i in range(adapters)])  # fmt: skip
            y = torch.zeros(rows, d_out, dtype=dtype)
            lora_ops: dict[str, LoraOp[Any]] = {"grouped": GroupedOp(), "native": NativeOp()}
            for op_name, op in lora_ops.items():
                if op_name == "native" and not native_usable(dtype):
                    continue
                calls[f"lora {op_name} {name}"] = functools.partial(op.add, y, x, weights, op.prepare(mapping))
        row = _median_us(calls, repeats)
        out[label] = row
        print(f"  {label:<17} " + "  ".join(f"{k} {v:8.1f}" for k, v in row.items()))
    return out


@contextmanager
def _labelled(model: LoraModel) -> Iterator[None]:
    """record_function labels around the LoRA op, attention, sampling, the LM head and the runner's forward pass;
    undone on exit. The attention label takes effect for engines built inside the block."""
    op, head = model.op, model.model.get_output_embeddings()

    def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(label):
                return fn(*args, **kwargs)

        return wrapped

    saved = (attention_module.cached_attention, engine_module.sample, ModelRunner.run)
    op.add = wrap("lora", op.add)  # type: ignore[method-assign]
    head.forward = wrap("lm_head", head.forward)
    attention_module.cached_attention = wrap("attention", saved[0])
    engine_module.sample = wrap("sampling", saved[1])
    ModelRunner.run = wrap("model", saved[2])  # type: ignore[method-assign]
    try:
        yield
    finally:
        del op.add, head.forward  # back to the class's methods
        attention_module.cached_attention, engine_module.sample, ModelRunner.run = saved  # type: ignore[method-assign]


def profile_steps(model: LoraModel, make_engine: Callable[[], Engine], trace: list[Req], names: list[str]) -> dict:
    """ms per engine step in each part of the step, over one run of ``trace`` (steps counted by the engine)."""
    with _labelled(model):
        engine = make_engine()
        steps = 0
        step = engine.step

        def counted() -> int:
            nonlocal steps
            steps += 1
            with record_function("step"):
                return step()

        engine.step = counted  # type: ignore[method-assign]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours(engine, trace, names)
        engine.shutdown()
    totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}  # ms
    linear = totals.get("aten::linear", 0.0) + totals.get("mkldnn::_linear_pointwise", 0.0)
    parts = {"lm_head": totals.get("lm_head", 0.0), "lora": totals.get("lora", 0.0),
             "attention": totals.get("attention", 0.0), "sampling": totals.get("sampling", 0.0)}  # fmt: skip
    parts["linears (not head)"] = linear - parts["lm_head"]
    parts["rest of model"] = totals.get("model", 0.0) - sum(parts.values()) + parts["sampling"]
    parts["rest of step"] = totals.get("step", 0.0) - totals.get("model", 0.0) - parts["sampling"]
    per_step = {k: v / max(1, steps) for k, v in parts.items()}
    per_step["step"] = totals.get("step", 0.0) / max(1, steps)
    return {"steps": steps, "ms_per_step": per_step}


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "The three laws of thermodynamics state that"]  # fmt: skip


@torch.inference_mode()
def accuracy(new_tokens: int) -> dict[str, Any]:
    """bfloat16 against float32 on the embedded model's base (plain HF forward passes, the frozen weights as loaded):
    the largest logit difference over every prompt position, how often the top-1 token agrees there, and how many of
    ``new_tokens`` greedy tokens agree before the two dtypes' generations first differ."""
    base_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    models: dict[str, Any] = {n: load_base_model(base_dir, "cpu", n) for n in DTYPES}
    diffs, agree, positions, prefix = [], 0, 0, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        f32, bf16 = (models[n](input_ids=ids).logits[0].float() for n in DTYPES)
        diffs.append(float((f32 - bf16).abs().max()))
        agree += int((f32.argmax(-1) == bf16.argmax(-1)).sum())
        positions += ids.shape[1]
        outs = [models[n].generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
                for n in DTYPES]  # fmt: skip
        same = (outs[0] == outs[1]).tolist()
        prefix.append(same.index(False) if False in same else len(same))
    result = {"logits_max_abs_diff": max(diffs), "prompt_top1_agreement": agree / positions,
              "greedy_identical_prefix": prefix, "new_tokens": new_tokens}  # fmt: skip
    print(f"accuracy, bfloat16 vs float32 on the base model: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_bf16", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50, help="calls per op measurement")
    parser.add_argument("--parts", default="ops,engine,profile,accuracy",
                        help="comma-separated: ops, engine, profile, accuracy")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    if unknown := parts - {"ops", "engine", "profile", "accuracy"}:
        parser.error(f"--parts: unknown {sorted(unknown)}")
    flags = read_cpu_flags()
    _, why = auto_dtype(torch.device("cpu"), flags)
    print(f"{torch.get_num_threads()} threads; --dtype auto here: {why}")
    figures: dict[str, Any] = {"auto_dtype_reason": why}
    if "ops" in parts:
        print(f"ops, us per call, 32 rows, {args.adapters} adapters of rank {args.rank}:")
        figures["ops_us"] = bench_ops(32, args.adapters, args.rank, args.repeats)
    if "accuracy" in parts:
        figures["accuracy"] = accuracy(32)
    if parts & {"engine", "profile"}:
        figures.update(engine_parts(args, parts))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))


def engine_parts(args: argparse.Namespace, parts: set[str]) -> dict[str, Any]:
    base_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, names = save_peft_adapters(base_dir, Path(tmp), args.adapters, args.rank)
        folders = {name: Path(tmp) / name for name in names}
        models = {n: LoraModel(load_base_model(base_dir, "cpu", n), args.adapters, args.rank) for n in DTYPES}
        config = EngineConfig(max_batch_size=32, max_seq_len=384, max_tokens_per_step=2048, cpu_slots=args.adapters)
        vocab = models["float32"].model.config.vocab_size
        trace = make_trace(args.requests, args.adapters, 1.0, vocab, args.seed)

        def make_engine(dtype: str) -> Callable[[], Engine]:
            return lambda: Engine(models[dtype], tokenizer, lambda name: folders[name], config)

        def contender(dtype: str, adapter_names: list[str] | None) -> Callable[[], tuple[float, int]]:
            def run() -> tuple[float, int]:
                engine = make_engine(dtype)()
                secs, made, _ = run_ours(engine, trace, adapter_names)
                engine.shutdown()
                return secs, made

            return run

        if "engine" in parts:
            contenders = {f"{d} {kind}": contender(d, names if kind == "mixed" else None)
                          for d in DTYPES for kind in ("base", "mixed")}  # fmt: skip
            timed = interleave(contenders, args.rounds, alternate=True)
            tps = {k: timed.last(k)[1] / min(timed.seconds[k]) for k in contenders}
            print(f"engine, {len(trace)} requests, {args.adapters} adapters, tokens/s (best of {args.rounds}):")
            for k, v in tps.items():
                print(f"  {k:<16} {v:7.1f}   (rounds: {', '.join(f'{s:.1f}' for s in timed.seconds[k])} s)")
            print(f"  bf16 base / f32 base = {tps['bfloat16 base'] / tps['float32 base']:.2f}; bf16 mixed / bf16 base"
                  f" = {tps['bfloat16 mixed'] / tps['bfloat16 base']:.2f}; f32 mixed / f32 base = "
                  f"{tps['float32 mixed'] / tps['float32 base']:.2f}")  # fmt: skip
            figures["engine_tokens_per_second"] = tps
        if "profile" in parts:
            # Decode-heavy: short prompts, 64 new tokens each, 8 adapters mixed.
            decode_trace = [Req(r.adapter, r.prompt[:16], 64) for r in trace]
            figures["profile"] = {}
            for dtype in DTYPES:
                result = profile_steps(models[dtype], make_engine(dtype), decode_trace, names)
                figures["profile"][dtype] = result
                print(f"profile {dtype}: {result['steps']} steps, ms per step: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in result["ms_per_step"].items()))  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
