"""The S-LoRA curve on this machine: how a real server's throughput and TTFT hold up as the number of registered
adapters grows (1, 10, 100, 1000), and what a cold adapter load adds to a first token.

For each N: a fresh ``lora-server serve`` process on the embedded SmolLM2-135M with N random rank-8 PEFT adapters
(q_proj, v_proj, float32, non-zero B) registered at boot from ``--startup-adapters``, then the same trace replayed
with loadtests.driver over ``/v1/generate`` (streaming, EOS ignored, greedy). Every N gets the same arrivals,
lengths and prompts (loadtests.trace draws each aspect from its own stream); only the adapter names differ,
drawn by S-LoRA's power law over the N adapters.

Cold load: on the largest-N server after its trace, requests name adapters that are only on disk (in no cache
tier, checked through ``GET /v1/adapters``), each followed by the same request again (warm); then, with the server
stopped, the same adapter files are read in-process with ``LoraModel.read_adapter`` (what the server does on a
miss: read, validate, convert) and with a plain ``safetensors`` load.

Control: the two compared N (10 and 1000) run again with ``--gpu-slots 32`` (= the default ``--max-batch-size``),
to tell the slot limit on distinct adapters per step apart from everything else (``--compare-slots 0``: skip).

Usage: python -m loadtests.bench_adapters [--counts 1,10,100,1000 --requests 80 --rate 4 --alpha 0.8 --no-doc]
Targets: throughput(1000) / throughput(10) >= 0.8; (cold - warm first token) < 3x the adapter read time.
Writes its figures into docs/benchmarks.md between the bench_adapters markers (unless --no-doc).
"""

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx
from safetensors.torch import load_file

from loadtests import driver
from loadtests.common.docs_section import wrap_markdown, write_section
from loadtests.common.factories import target_shapes, write_random_adapters
from loadtests.common.server_process import ServerProcess
from loadtests.trace import TraceConfig, TraceRequest, adapter_names, generate, make_prompt
from server.model.embedded import ensure_embedded_model

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "bench_adapters"  # the markers in DOC between which the figures go
RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")
READ_REPS = 3
SERVER_FLAGS = ("--max-seq-len", "512")  # the rest are the server's defaults (printed below)


# ---- adapters ---------------------------------------------------------------------------------------------------
def startup_folder(root: Path, adapters: list[Path], count: int) -> Path:
    """A folder of symlinks to the first ``count`` adapters, for ``--startup-adapters``."""
    folder = root / f"startup-{count}"
    if not folder.exists():
        folder.mkdir()
        for src in adapters[:count]:
            (folder / src.name).symlink_to(src, target_is_directory=True)
    return folder


# ---- measurements -----------------------------------------------------------------------------------------------
def first_token(url: str, adapter: str | None, prompt: str) -> float:
    """TTFT (s) of one streamed request of 2 tokens on an otherwise idle server."""
    req = TraceRequest(0.0, adapter, len(prompt.split()), 2, prompt)
    summary, records = driver.run([req], driver.Target(url, "generate"))
    if not records[0].ok or records[0].ttft is None:
        raise RuntimeError(f"request on {adapter!r} failed: {records[0].error}")
    return records[0].ttft


_COUNTERS = ("lora_step_tokens_count", "lora_step_tokens_sum", "lora_adapter_cache_misses",
             "lora_adapter_cache_loads", "lora_adapter_load_seconds")  # fmt: skip


def engine_counters(url: str) -> dict[str, float]:
    """The server's step and adapter-cache counters from /metrics (summed over labels; ``_total`` suffix dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = dict.fromkeys(_COUNTERS, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in values:
                values[name] += sample.value
    return values


def states(url: str) -> dict[str, str]:
    return {a["name"]: a["state"] for a in httpx.get(f"{url}/v1/adapters", timeout=60).json()["adapters"]}


def cold_loads(url: str, names: list[str], reps: int) -> list[dict[str, Any]]:
    """For ``reps`` adapters that are only on disk: first-token time cold, then warm (the same request again)."""
    prompt = make_prompt(16, random.Random(0))
    first_token(url, None, prompt)  # the model is warm, whatever ran before
    where = states(url)
    chosen = [n for n in reversed(names) if where.get(n) == "disk"][:reps]
    out = []
    for name in chosen:
        cold = first_token(url, name, prompt)
        warm = first_token(url, name, prompt)
        out.append({"adapter": name, "cold_s": cold, "warm_s": warm, "state_after": states(url)[name]})
    return out


def upload_seconds(url: str, folders: list[Path]) -> float:
    """Mean seconds to register one adapter over HTTP (multipart upload), for comparison with boot registration."""
    start = time.perf_counter()
    for i, folder in enumerate(folders):
        config, weights = "adapter_config.json", "adapter_model.safetensors"
        files = {"adapter_config": (config, (folder / config).read_bytes()),
                 "adapter_model": (weights, (folder / weights).read_bytes())}  # fmt: skip
        r = httpx.post(f"{url}/v1/adapters", data={"name": f"upload-{i}"}, files=files, timeout=60)
        r.raise_for_status()
    return (time.perf_counter() - start) / len(folders)


def read_times(base_dir: Path, folders: list[Path], max_rank: int, reps: int = READ_REPS) -> dict[str, float]:
    """Seconds, per adapter, of the work of a cold load: reading it with ``LoraModel.read_adapter`` (read, validate,
    convert: the server's miss path), a plain safetensors load for comparison, and putting it into a slot as the
    slot cache does on an eviction (``clear_slot``, then ``write_slot``). Best of ``reps`` x adapters: on a shared
    2-core machine torch's worker threads get descheduled by other processes and single timings jump tenfold."""
    from server.model.loader import load_base_model
    from server.model.lora_model import LoraModel

    model = LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), 1, max_rank)
    times: dict[str, list[float]] = {"read_adapter_s": [], "safetensors_s": [], "slot_write_s": []}
    for _ in range(reps):
        for folder in folders:
            t0 = time.perf_counter()
            weights = model.read_adapter(folder)
            t1 = time.perf_counter()
            load_file(str(folder / "adapter_model.safetensors"))
            json.loads((folder / "adapter_config.json").read_text())
            t2 = time.perf_counter()
            model.clear_slot(1)
            model.write_slot(1, weights)
            t3 = time.perf_counter()
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(seconds)
    return {key: min(values) for key, values in times.items()}


def server_max_rank(args: argparse.Namespace) -> int:
    flags = shlex.split(args.server_args)
    return int(flags[flags.index("--max-rank") + 1]) if "--max-rank" in flags else 64  # the server's default


def run_count(args: argparse.Namespace, base_dir: Path, work: Path, adapters: list[Path], n: int, cold: bool,
              extra: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """One server with ``n`` adapters registered at boot (and ``extra`` flags): the trace, and (``cold``) the
    cold-load probes."""
    trace = generate(TraceConfig(adapters=n, popularity="power", alpha=args.alpha, rate=args.rate, cv=1.0,
                                 requests=args.requests, prompt_len=tuple(args.prompt_len),
                                 output_len=tuple(args.output_len), seed=args.seed))  # fmt: skip
    flags = (*SERVER_FLAGS, *shlex.split(args.server_args), *extra)
    data = work / "-".join(["data", str(n), *(f.strip("-") for f in extra)])
    server = ServerProcess(base_dir, data, "--startup-adapters", str(startup_folder(work, adapters, n)), *flags)
    t0 = time.perf_counter()
    server.start(timeout=600)
    boot = time.perf_counter() - t0
    try:
        first_token(server.url, None, "warm up the model")  # first forward passes are slower; keep them out
        before = engine_counters(server.url)
        summary, _ = driver.run(trace, driver.Target(server.url, "generate"), args.slo_ttft)
        after = engine_counters(server.url)
        engine = {k: after[k] - before[k] for k in _COUNTERS}
        result: dict[str, Any] = {"adapters": n, "boot_s": boot, "distinct": len({r.adapter for r in trace}),
                                  "summary": summary, "engine": engine}  # fmt: skip
        if cold:
            result["cold"] = cold_loads(server.url, adapter_names(n), args.cold_reps)
            result["cold_paths"] = [str(server.data_dir / "adapters" / c["adapter"]) for c in result["cold"]]
        if n == min(args.counts) and not extra:
            result["upload_s"] = upload_seconds(server.url, adapters[:10])
    finally:
        server.stop()
    print(f"  N={n:<5}{' '.join(extra)} boot {boot:5.1f} s  {result['distinct']:3d} distinct  "
          f"{summary['throughput_rps']:.2f} req/s  {summary['output_tps']:6.1f} tok/s  "
          f"TTFT p99 {summary['ttft_s']['p99'] or 0:.2f} s  errors {summary['errors'] or '-'}", flush=True)
    return result


# ---- report -----------------------------------------------------------------------------------------------------
def _per_step(result: dict[str, Any]) -> float:
    """Mean tokens of a non-idle engine step during the trace."""
    return float(result["engine"]["lora_step_tokens_sum"] / max(1.0, result["engine"]["lora_step_tokens_count"]))


def _ends(args: argparse.Namespace) -> tuple[int, int]:
    """The two N whose throughputs are compared: 10 (or the smallest) and the largest."""
    return (10 if 10 in args.counts else min(args.counts)), max(args.counts)


def report(args: argparse.Namespace, results: list[dict[str, Any]], compare: list[dict[str, Any]],
           reads: dict[str, float], elapsed: float) -> str:  # fmt: skip
    by_n = {r["adapters"]: r for r in results}
    lines = ["| adapters | distinct in trace | ok | req/s | output tok/s | TTFT p50 (s) | TTFT p99 (s) | "
             "TPOT mean (ms) | tokens / step | slot loads | boot (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        s, e = r["summary"], r["engine"]
        per_step = _per_step(r)
        lines.append(f"| {r['adapters']} | {r['distinct']} | {s['ok']}/{s['requests']} | {s['throughput_rps']:.2f} | "
                     f"{s['output_tps']:.1f} | {s['ttft_s']['p50']:.2f} | {s['ttft_s']['p99']:.2f} | "
                     f"{1000 * s['tpot_s']['mean']:.0f} | {per_step:.1f} | {e['lora_adapter_cache_misses']:.0f} | "
                     f"{r['boot_s']:.1f} |")  # fmt: skip
    out = lines + [""]
    lo, hi = _ends(args)
    ratio = by_n[hi]["summary"]["throughput_rps"] / by_n[lo]["summary"]["throughput_rps"]
    out.append(f"- throughput({hi}) / throughput({lo}) = **{ratio:.2f}** (target >= 0.8: "
               f"{'met' if ratio >= 0.8 else '**not met**'})")  # fmt: skip
    if compare:
        (a, b), k = [c["summary"] for c in compare], args.compare_slots
        steps = [_per_step(c) for c in compare]
        again = b["throughput_rps"] / a["throughput_rps"]
        explained = again > ratio + 0.1 and steps[1] > 1.1 * _per_step(by_n[hi])
        why = (" With fewer slots than `--max-batch-size` a step never holds more distinct adapters than slots, so "
               "when nearly every request names its own adapter the running batch shrinks (tokens / step)."
               if explained else " Not clearly different from the default slots on this noisy machine.")
        out.append(f"- the same two runs again with `--gpu-slots {k}`: throughput({hi}) / throughput({lo}) = "
                   f"**{again:.2f}** ({a['throughput_rps']:.2f} and {b['throughput_rps']:.2f} req/s, {steps[0]:.1f} "
                   f"and {steps[1]:.1f} tokens / step).{why}")  # fmt: skip
    if "upload_s" in by_n[min(args.counts)] and hi - min(args.counts) >= 100:  # else boot-time noise dominates
        boot_per = (by_n[hi]["boot_s"] - by_n[min(args.counts)]["boot_s"]) / max(1, hi - min(args.counts))
        out.append(f"- registering one adapter: {1000 * boot_per:.0f} ms at boot (`--startup-adapters`, from the "
                   f"boot times) vs {1000 * by_n[min(args.counts)]['upload_s']:.0f} ms by HTTP upload")  # fmt: skip
    cold = by_n[hi].get("cold", [])
    if cold:
        c = statistics.median(x["cold_s"] for x in cold)
        w = statistics.median(x["warm_s"] for x in cold)
        added = statistics.median(x["cold_s"] - x["warm_s"] for x in cold)
        read = reads["read_adapter_s"]
        out += ["", f"Cold adapter load, N = {hi} server, {len(cold)} adapters that were only on disk (first tokens: "
                f"medians; in-process reads and slot writes: best of {READ_REPS * len(cold)}):", "",
                "| | ms |", "| --- | --- |", f"| first token, cold (adapter on disk only) | {1000 * c:.1f} |",
                f"| first token, warm (the same request again) | {1000 * w:.1f} |",
                f"| added by the cold load (median over adapters of cold - warm) | {1000 * added:.1f} |",
                f"| reading the adapter: `LoraModel.read_adapter` (read, validate, convert) | {1000 * read:.1f} |",
                f"| reading the adapter: plain `safetensors` load_file | {1000 * reads['safetensors_s']:.1f} |",
                f"| putting it in a slot: `clear_slot` + `write_slot` (max rank {server_max_rank(args)}) | "
                f"{1000 * reads['slot_write_s']:.1f} |", "",
                f"- added / read = **{added / read:.2f}** "
                f"(target < 3: {'met' if added < 3 * read else '**not met**'}); read + slot write = "
                f"{1000 * (read + reads['slot_write_s']):.1f} ms of the {1000 * added:.1f} ms added, the rest is "
                "not these two (waits between the engine loop and the reader thread, contention)"]  # fmt: skip
    out.append(f"- whole run: {elapsed / 60:.1f} min")
    return "\n".join(out)


def _shown_command(argv: list[str]) -> str:
    """The command line without the options that change where output goes, not the figures."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--workdir"):
            skip = True
        elif arg != "--no-doc" and not arg.startswith(("--json=", "--workdir=")):
            shown.append(shlex.quote(arg))
    return " ".join([".venv/bin/python", "-m", "loadtests.bench_adapters", *shown])


def doc_section(args: argparse.Namespace, results: list[dict[str, Any]], table: str, argv: list[str]) -> str:
    flags = " ".join([*SERVER_FLAGS, *shlex.split(args.server_args)])
    # behind the load when it served well under what arrived (then throughput is its capacity)
    saturated = all(r["summary"]["throughput_rps"] < 0.6 * r["summary"]["offered_rate"] for r in results)
    load = ("above what this CPU serves, so throughput is the server's capacity and TTFT is mostly queueing"
            if saturated else "not above what the server serves for every N, so throughput partly follows the rate")
    prompts, outputs = "..".join(map(str, args.prompt_len)), "..".join(map(str, args.output_len))
    prose = (
        f"{date.today().isoformat()}. A fresh server process per N: `lora-server serve` on SmolLM2-135M-Instruct "
        f"(float32, CPU) with `{flags}`, every other flag at its default (`--gpu-slots 16 --cpu-slots 64 "
        f"--max-batch-size 32 --max-rank 64 --max-tokens-per-step 2048`), and N random rank-{RANK} PEFT adapters on "
        f"q_proj and v_proj (float32, 1.8 MB each) registered at boot from `--startup-adapters`. The same trace for "
        f"every N: {args.requests} requests, Gamma arrivals at {args.rate:g} req/s with cv 1, prompts {prompts} "
        f"tokens, outputs {outputs} tokens (EOS ignored), greedy, adapters drawn by S-LoRA's power law (alpha "
        f"{args.alpha:g}) over the N adapters, replayed open-loop by `loadtests.driver` over streaming "
        f"`/v1/generate`. The rate is {load}. Tokens / step: mean tokens of a (non-idle) engine step during the trace, "
        f"decode rows plus prefill chunks; slot loads: adapter cache misses (an adapter written into a slot); both "
        f"from the server's /metrics. The driver shares the 2 cores with the server and other jobs ran on "
        f"the machine: each N is a single run, and the same N varies by up to ±30% between runs."
    )
    body = f"## Many adapters on one server (issue 5)\n\n```bash\n{_shown_command(argv)}   # or: make bench\n```\n\n"
    return wrap_markdown(f"{body}{prose}\n\n{table}\n")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_adapters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100, 1000])
    parser.add_argument("--requests", type=int, default=80, help="requests per N")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--alpha", type=float, default=0.8, help="S-LoRA power-law exponent (1 = uniform)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128), metavar=("LOW", "HIGH"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 64), metavar=("LOW", "HIGH"))
    parser.add_argument("--slo-ttft", type=float, default=5.0, help="seconds")
    parser.add_argument("--cold-reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-slots", type=int, default=32,
                        help="rerun the two compared N with this many --gpu-slots (0: skip)")
    parser.add_argument("--server-args", default="", help='more server flags, e.g. "--gpu-slots 32"')
    parser.add_argument("--workdir", type=Path, default=None, help="keep adapters, data dirs and server logs here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    base_dir = ensure_embedded_model()
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shapes = target_shapes(base_dir, TARGETS)
        adapters = write_random_adapters(work / "adapters", adapter_names(max(args.counts)), shapes, RANK, ALPHA)
        os.sync()  # write the 1.8 GB back now, not during the first server's trace
        print(f"{len(adapters)} adapters written in {time.perf_counter() - t0:.1f} s; server flags "
              f"{' '.join(SERVER_FLAGS)} {args.server_args} (others default)", flush=True)  # fmt: skip
        results = [run_count(args, base_dir, work, adapters, n, cold=n == max(args.counts)) for n in args.counts]
        slots, ends = ("--gpu-slots", str(args.compare_slots)), _ends(args)
        again = args.compare_slots and ends[0] != ends[1]
        compare = [run_count(args, base_dir, work, adapters, n, False, slots) for n in ends] if again else []
        cold_paths = [Path(p) for r in results for p in r.get("cold_paths", [])]
        reads = read_times(base_dir, cold_paths, server_max_rank(args)) if cold_paths else {}
    table = report(args, results, compare, reads, time.perf_counter() - start)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"workdir": str(args.workdir)}, "results": results,
                                         "reads": reads}, indent=1, default=str) + "\n")  # fmt: skip
    if not args.no_doc:
        write_section(DOC, SECTION, doc_section(args, results, table, argv))
        print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
