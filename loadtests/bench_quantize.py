"""Memory and speed of the base model stored as none / int8 / nf4 (``--quantize``), on the embedded model, in one run.

Memory: each format is loaded in a fresh child process (the libraries imported first), then runs one forward pass
(every weight read once) and hands freed heap back (malloc_trim): the weight bytes as stored (``stored_bytes``),
the resident memory the load added, split into anonymous memory (what the process holds itself) and file pages
(the safetensors file mapped by transformers: a float model's weights are served straight from it), the peak
(VmHWM) and the load time.
Speed: the three LoraModels side by side in this process, each behind its own engine, timed round by round in
alternating order after one untimed round (the fastest round kept), on two workloads, EOS ignored so all make the
same number of tokens:
  batch   R requests at once (P prompt tokens, N new tokens each; a third on the base, the rest over A adapters)
  single  one request on an adapter, alone (decode of one row)
with the share of greedy tokens equal to the float base's (up to each request's first divergence), and each
format's perplexity on the prompts' English text (base model).
Ops (why int8 is torchao): one projection of the model's shapes, float vs torchao int8 weight-only vs bitsandbytes
Linear8bitLt vs bitsandbytes NF4, at decode rows. Paper: weight bytes of Llama-3-8B per format, from the byte formula
that is printed next to the measured bytes of the embedded model.

Usage: python -m loadtests.bench_quantize [--requests 12 --prompt-tokens 32 --new-tokens 32 --adapters 4 --rank 16
                                          --rounds 2 --dtype float32 --threads N] [--no-ops] [--json out.json]
"""

import argparse
import ctypes
import functools
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loadtests.common.factories import target_shapes, write_random_adapters
from loadtests.common.timing import interleave
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling_params import SamplingParams
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.model.quantize import stored_bytes

METHODS = ("none", "int8", "nf4")
TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe built wooden "
    "machines that riders pushed along with their feet. Pedals came later, fixed to the front wheel, and the large "
    "front wheels of the penny-farthing followed, until the safety bicycle, with two wheels of equal size and a "
    "chain to the rear wheel, became the model that most bicycles still follow today."
)
# meta-llama/Meta-Llama-3-8B's config.json, the fields the byte formula reads.
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}  # fmt: skip


def paper_bytes(cfg: dict, method: str, element: int) -> int:
    """Weight bytes of a Llama-shaped model: decoder linears as ``method`` stores them (int8: 1 byte + a float32
    scale and an int8 zero point per output row; nf4: half a byte + a float32 absmax per 64 weights + a 16-entry
    float32 code per linear), embeddings, output head and norms at ``element`` bytes. Buffers are left out."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # (in, out) of q k v o gate up down
    if method == "none":
        linear = sum(a * b * element for a, b in shapes)
    elif method == "int8":
        linear = sum(a * b + b * 5 for a, b in shapes)
    else:
        linear = sum(a * b // 2 + -(-a * b // 64) * 4 + 64 for a, b in shapes)
    embeddings = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * linear + (embeddings + (2 * layers + 1) * h) * element


def proc_mib() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def child(base_dir: Path, method: str, dtype: str) -> None:
    """Load one format in this fresh process, run one forward pass (every weight read once), hand freed heap back
    to the system, and print the memory figures as one JSON line."""
    import bitsandbytes  # noqa: F401  # the libraries' own memory is not the model's
    import torchao  # noqa: F401

    before = proc_mib()
    start = time.perf_counter()
    model = load_base_model(base_dir, "cpu", dtype, method)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        model(input_ids=torch.arange(10, 26)[None])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = proc_mib()
    figures = {"weight_bytes": stored_bytes(model), "load_seconds": seconds, "peak_mib": after["VmHWM"],
               **{f"{k}_added_mib": after[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile")}}  # fmt: skip
    print(json.dumps(figures))


def measure_memory(base_dir: Path, dtype: str, threads: int | None) -> dict[str, dict]:
    out = {}
    for method in METHODS:
        cmd = [sys.executable, "-m", "loadtests.bench_quantize", "--child", method, "--dtype", dtype,
               "--base-model", str(base_dir), *(["--threads", str(threads)] if threads else [])]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def run_engine(engine: Engine, trace: list[tuple[list[int], str | None]], new_tokens: int) -> list[list[int]]:
    handles = [engine.submit(p, a, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p, a in trace]
    while engine.has_work():
        if engine.step() == 0:
            time.sleep(0.001)
    results = [h.result() for h in handles]
    if any(r.error for r in results):
        raise RuntimeError(f"a request failed: {next(r.error for r in results if r.error)}")
    return [list(r.token_ids) for r in results]


def measure_speed(args: argparse.Namespace, base_dir: Path, folders: dict[str, Path]) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    names = list(folders)
    models = {m: LoraModel(load_base_model(base_dir, "cpu", args.dtype, m), len(names), args.rank) for m in METHODS}
    # Windows of English text, so greedy agreement is measured where the model is confident (on random token ids
    # its next-token distribution is nearly flat, and any rounding flips the first token).
    text = tokenizer(" ".join([TEXT] * (1 + (8 * args.requests + args.prompt_tokens) // 50)))["input_ids"]
    trace = [(text[8 * k : 8 * k + args.prompt_tokens], None if k % 3 == 0 else names[k % len(names)])
             for k in range(args.requests)]  # fmt: skip
    return {
        "perplexity": {m: perplexity(models[m], tokenizer(TEXT)["input_ids"]) for m in METHODS},
        "batch": time_workload(args, models, tokenizer, folders, trace),
        "single": time_workload(args, models, tokenizer, folders, [(trace[1][0], names[0])]),
    }


@torch.inference_mode()
def perplexity(model: LoraModel, ids: list[int]) -> float:
    """The base model's perplexity on ``ids`` (no adapter): how much quantization costs the model."""
    tensor = torch.tensor([ids])
    return math.exp(model.model(input_ids=tensor, labels=tensor, use_cache=False).loss.item())


def time_workload(args: argparse.Namespace, models: dict[str, LoraModel], tokenizer: PreTrainedTokenizerBase,
                  folders: dict[str, Path], requests: list[tuple[list[int], str | None]]) -> dict:  # fmt: skip
    """Every format on ``requests`` submitted at once (max batch size = their number), ``args.rounds`` times."""
    config = EngineConfig(max_batch_size=len(requests), max_seq_len=args.prompt_tokens + args.new_tokens + 16,
                          cpu_slots=len(folders))  # fmt: skip
    warm = [(requests[0][0][:8], a) for a in dict.fromkeys(a for _, a in requests)]  # each adapter read once

    def contender(method: str) -> tuple[float, list[list[int]]]:
        engine = Engine(models[method], tokenizer, folders.__getitem__, config)
        run_engine(engine, warm, 2)  # adapters resident and kernels built before the clock starts
        start = time.perf_counter()
        tokens = run_engine(engine, requests, args.new_tokens)
        seconds = time.perf_counter() - start
        engine.shutdown()
        return seconds, tokens

    timed = interleave({m: functools.partial(contender, m) for m in METHODS}, args.rounds, warmup=1, alternate=True)
    made = len(requests) * args.new_tokens
    return {
        "tokens_per_second": {m: made / min(s for s, _ in timed.results[m]) for m in METHODS},
        "round_seconds": {m: [s for s, _ in timed.results[m]] for m in METHODS},
        "greedy_agreement_with_none": {m: _agreement(timed.last(m)[1], timed.last("none")[1]) for m in METHODS},
    }


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions, up to each request's first divergence, whose greedy token equals the reference's."""
    equal = total = 0
    for ours, ref in zip(tokens, reference, strict=True):
        total += len(ref)
        equal += next((k for k, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), len(ref))
    return equal / total


def measure_ops(shapes: list[tuple[int, int]], rows: list[int], dtype: torch.dtype) -> list[dict]:
    """Microseconds of one projection per contender, at each shape and row count (median of 30 calls)."""
    import bitsandbytes as bnb
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def int8_torchao(linear: nn.Linear) -> nn.Module:
        quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
        return linear

    def int8_bnb(linear: nn.Linear) -> nn.Module:
        m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
        m.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        return m.to("cpu")

    def nf4_bnb(linear: nn.Linear) -> nn.Module:
        m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                              quant_type="nf4")  # fmt: skip
        m.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        return m.to("cpu")

    makers = {"float": lambda linear: linear, "int8-torchao": int8_torchao, "int8-bnb": int8_bnb, "nf4-bnb": nf4_bnb}
    table = []
    for n_in, n_out in shapes:
        for r in rows:
            x = torch.randn(r, n_in).to(dtype)
            row = {"shape": f"{n_in}x{n_out}", "rows": r}
            for name, make in makers.items():
                torch.manual_seed(0)
                module = make(nn.Linear(n_in, n_out, bias=False).to(dtype).eval())
                row[name] = _median_us(module, x)
            table.append(row)
    return table


@torch.inference_mode()
def _median_us(module: nn.Module, x: torch.Tensor, calls: int = 30) -> float:
    for _ in range(3):
        module(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ops", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_dir = args.base_model or ensure_embedded_model()
    if args.child:
        return child(base_dir, args.child, args.dtype)
    cfg = json.loads((base_dir / "config.json").read_text())
    element = 4 if args.dtype == "float32" else 2
    figures: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "memory": measure_memory(base_dir, args.dtype, args.threads),
    }
    print(f"{base_dir.name}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'format':<6} {'weights MiB':>11} {'x none':>6} {'paper MiB':>9} {'RSS+ MiB':>8} {'anon+':>6} "
          f"{'file+':>6} {'peak MiB':>8} {'load s':>6}")  # fmt: skip
    mem = figures["memory"]
    for m in METHODS:
        f = mem[m]
        print(f"{m:<6} {f['weight_bytes'] / 2**20:11.1f} {f['weight_bytes'] / mem['none']['weight_bytes']:6.3f} "
              f"{paper_bytes(cfg, m, element) / 2**20:9.1f} {f['VmRSS_added_mib']:8.0f} {f['RssAnon_added_mib']:6.0f} "
              f"{f['RssFile_added_mib']:6.0f} {f['peak_mib']:8.0f} {f['load_seconds']:6.1f}")  # fmt: skip
    figures["llama3_8b_paper_bytes"] = paper = {f"{m}-{dt}": paper_bytes(LLAMA3_8B, m, e)
                                                for dt, e in (("bf16", 2), ("fp32", 4)) for m in METHODS}  # fmt: skip
    print("Llama-3-8B on paper, weights GiB (x none): " + ", ".join(
        f"{key} {b / 2**30:.2f} ({b / paper['none-' + key.split('-')[1]]:.3f})" for key, b in paper.items()
    ))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        names = [f"adapter{i}" for i in range(args.adapters)]
        shapes = target_shapes(base_dir, ("q_proj", "k_proj", "v_proj", "o_proj"))
        folders = dict(zip(names, write_random_adapters(Path(tmp), names, shapes, args.rank, 2 * args.rank),
                           strict=True))  # fmt: skip
        figures["speed"] = speed = measure_speed(args, base_dir, folders)
    print(
        "perplexity on the prompt text, base model: "
        + ", ".join(f"{m} {p:.2f}" for m, p in speed["perplexity"].items())
    )
    for workload in ("batch", "single"):
        s = speed[workload]
        tps, same = s["tokens_per_second"], s["greedy_agreement_with_none"]
        print(f"{workload:<6} tokens/s: " + ", ".join(
            f"{m} {tps[m]:.1f} ({tps[m] / tps['none']:.2f}x, greedy = none {same[m]:.0%})" for m in METHODS
        ))  # fmt: skip

    if args.ops:
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        dtype = getattr(torch, args.dtype)
        figures["ops_us"] = table = measure_ops([(h, h), (h, i), (i, h)], [1, 8, 32], dtype)
        print(f"one projection, {args.dtype}, median us (x = int8-torchao / int8-bnb):")
        for row in table:
            print(f"  {row['shape']:>9} rows {row['rows']:>2}: " + ", ".join(
                f"{k} {row[k]:.0f}" for k in ("float", "int8-torchao", "int8-bnb", "nf4-bnb")
            ) + f"  x {row['int8-torchao'] / row['int8-bnb']:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
