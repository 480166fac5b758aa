"""Replicas on Ray Serve: adapter-affinity routing vs plain round-robin, and the Ray path vs a direct server.

Workload: ``--adapters`` random rank-8 LoRA adapters (q/k/v/o projections, ``write_random_adapters``) registered at
startup from one folder into the shared store, and a Zipf trace (``loadtests.trace``, exponent ``--alpha``) of
``--requests`` streamed requests, ``--output-tokens`` each (EOS ignored, greedy), replayed open-loop by
``loadtests.driver``. Before the measurement every adapter is requested once (1 token, least popular first), so
the count is of steady-state loads, not of each adapter's first read; TTFT and tokens/s come from the driver.
  A (routing)   ``serve-ray --replicas 2`` run twice, ``--routing adapter`` (Ray Serve's multiplexed model id)
                and ``--routing round-robin``, the same trace at ``--rate``: about half of what 2 one-CPU
                replicas of SmolLM2 serve on the 2-core dev machine (~2.3 req/s); past capacity Ray Serve sends a
                request on to a replica without its adapter when the one with it is full, and affinity is lost
                (loads ratio 1.03 measured at 6 req/s). Adapter loads = disk reads, the sum of
                ``lora_adapter_cache_loads_total`` over the replicas in the ingress's ``/metrics``, after minus
                before the trace. Per-replica cache: ``--gpu-slots`` + ``--cpu-slots`` (default 8 + 112 = 120
                of 200): one replica cannot hold every adapter, two together can, which is the case affinity is
                for (with 8 + 8 the Zipf tail's misses dominate both routings alike; try it with the flags).
  B (overhead)  ``serve-ray --replicas 1 --replica-cpus 2`` vs ``lora-server serve`` with the same engine flags,
                the trace sent all at once (throughput is then what the server can do, not what is offered);
                then the first ``--check`` requests one at a time to both, non-streaming: greedy texts compared.
Goals (issue 17): loads round-robin / adapter >= 3; tokens/s ray / direct >= 0.90. Exits 0 either way.

Usage: python -m loadtests.bench_ray [--parts a,b --requests 400 --adapters 200 --rate 1.2 --seed 0 --json out.json]
       [--base-model DIR | --tiny]
"""

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtests import driver
from loadtests.common.factories import save_tiny_model, target_shapes, write_random_adapters
from loadtests.common.server_process import ServerProcess
from loadtests.trace import TraceConfig, TraceRequest, adapter_names, describe, generate, prompt_text
from server.model.embedded import ensure_embedded_model

LOADS = "lora_adapter_cache_loads_total"  # CounterMetricFamily("lora_adapter_cache_loads") as exposed
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RAY_NOTE = ("Ray's own processes (raylet, GCS, Serve proxy and controller, ingress, directory) share the machine's "
            "cores with the replicas")  # fmt: skip


def total_loads(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == LOADS)


def settled_loads(url: str, ray: bool) -> float:
    """The loads counter once it stops moving: Ray replicas push their metrics to the ingress every second."""
    last = total_loads(url)
    for _ in range(20 if ray else 0):
        time.sleep(1.5)
        now = total_loads(url)
        if now == last:
            break
        last = now
    return last


def generate_text(url: str, req: TraceRequest, prompt: str) -> str:
    body = {"adapter": req.adapter, "prompt": prompt, "max_new_tokens": req.max_new_tokens,
            "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/generate", json=body, timeout=600)
    r.raise_for_status()
    return str(r.json()["text"])


def warm_up(url: str, names: Sequence[str]) -> None:
    """One 1-token request per adapter, least popular first (trace names are in popularity order)."""
    for name in reversed(names):
        generate_text(url, TraceRequest(0.0, name, 8, 1), "the customer asked about a refund")


def start(base: Path, root: Path, label: str, engine_flags: list[str], ray_flags: list[str] | None) -> ServerProcess:
    data = root / label
    data.mkdir()
    flags = [*engine_flags, *(ray_flags or [])]
    server = ServerProcess(base, data / "store", *flags, command="serve" if ray_flags is None else "serve-ray")
    began = time.monotonic()
    server.start(timeout=900)
    if ray_flags is not None:  # /ready answers once one replica is up; wait for all of them
        want = int(ray_flags[ray_flags.index("--replicas") + 1])
        deadline = time.monotonic() + 600
        while httpx.get(f"{server.url}/ready", timeout=10).json().get("replicas_up", 0) < want:
            if time.monotonic() > deadline:
                server.stop(timeout=60)
                raise RuntimeError(f"{label}: not {want} replicas up after 600 s; log {server.log}")
            time.sleep(1)
    print(f"  ({label}: up in {time.monotonic() - began:.0f} s)", flush=True)
    return server


def measure(server: ServerProcess, trace: list[TraceRequest], names: Sequence[str], ray: bool) -> dict[str, Any]:
    warm_up(server.url, names)
    before = settled_loads(server.url, ray)
    summary, _ = driver.run(trace, driver.Target(server.url))
    loads = settled_loads(server.url, ray) - before
    return {"loads": loads, "loads_per_1k": 1000 * loads / len(trace), "ok": summary["ok"],
            "errors": summary["errors"], "ttft_p50_s": summary["ttft_s"]["p50"],
            "ttft_p99_s": summary["ttft_s"]["p99"], "output_tps": summary["output_tps"],
            "duration_s": summary["duration_s"]}  # fmt: skip


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def _row(label: str, m: dict[str, Any], n: int) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in m["errors"].items()) or "-"
    return (f"  {label:<12}{m['loads']:>7.0f}{m['loads_per_1k']:>10.0f}{_ms(m['ttft_p50_s']):>10}"
            f"{_ms(m['ttft_p99_s']):>9}{m['output_tps']:>9.1f}{m['ok']:>6}/{n:<5}{errors}")  # fmt: skip


HEAD = f"  {'':<12}{'loads':>7}{'per 1k':>10}{'TTFT p50':>10}{'p99 ms':>9}{'tok/s':>9}{'ok':>6}"


def _verdict(value: float, goal: float) -> str:
    return f"goal >= {goal:g}: {'met' if value >= goal else 'NOT met'}"


def part_a(base: Path, root: Path, trace: list[TraceRequest], names: list[str], engine: list[str],
           args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for routing in ("adapter", "round-robin"):
        ray = ["--replicas", "2", "--replica-cpus", "1", "--ray-num-cpus", str(args.ray_num_cpus),
               "--routing", routing]  # fmt: skip
        server = start(base, root, f"a-{routing}", engine, ray)
        try:
            out[routing] = measure(server, trace, names, ray=True)
        finally:
            server.stop(timeout=60)
    out["loads_ratio"] = out["round-robin"]["loads"] / max(out["adapter"]["loads"], 1.0)
    print(
        f"\nPart A: routing, 2 replicas x 1 CPU, per-replica cache {args.gpu_slots} slots + {args.cpu_slots} host "
        f"copies, {len(trace)} requests at {args.rate:g} req/s (adapter loads = disk reads, after warm-up)"
    )
    print(HEAD)
    for routing in ("adapter", "round-robin"):
        print(_row(routing, out[routing], len(trace)))
    max_one = "(no loads with adapter routing: ratio taken against 1)" if out["adapter"]["loads"] == 0 else ""
    print(f"  loads round-robin / adapter = {out['loads_ratio']:.2f}  ({_verdict(out['loads_ratio'], 3)}) {max_one}")
    return out


def part_b(base: Path, root: Path, trace: list[TraceRequest], names: list[str], engine: list[str],
           args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    burst = [replace(r, arrival=0.001 * (i + 1)) for i, r in enumerate(trace)]  # all at once: capacity-bound
    checks = trace[: args.check]
    prompts = [prompt_text(r, i, args.seed) for i, r in enumerate(checks)]
    out: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    threads = args.engine_threads
    cpus = ["--replica-cpus", str(threads or 2)]  # a replica's torch threads = its reserved CPUs
    ray_flags = ["--replicas", "1", *cpus, "--ray-num-cpus", str(args.ray_num_cpus)]
    direct_flags = [] if threads is None else ["--cpu-threads", str(threads)]
    for path, flags in (("direct", None), ("ray", ray_flags)):
        server = start(base, root, f"b-{path}", [*engine, *(direct_flags if flags is None else [])], flags)
        try:
            out[path] = measure(server, burst, names, ray=flags is not None)
            texts[path] = [generate_text(server.url, r, p) for r, p in zip(checks, prompts, strict=True)]
        finally:
            server.stop(timeout=60)
    out["tps_ratio"] = out["ray"]["output_tps"] / max(out["direct"]["output_tps"], 1e-9)
    out["texts_equal"] = sum(a == b for a, b in zip(texts["direct"], texts["ray"], strict=True))
    out["texts_checked"] = len(checks)
    print(
        f"\nPart B: overhead, 1 replica (serve-ray {' '.join(cpus)}) vs {' '.join(['lora-server serve', *direct_flags])}, "  # noqa: E501
        f"same engine flags, {len(trace)} requests sent at once"
    )
    print(HEAD)
    for path in ("direct", "ray"):
        print(_row(path, out[path], len(trace)))
    print(f"  tokens/s ray / direct = {out['tps_ratio']:.3f}  ({_verdict(out['tps_ratio'], 0.9)})")
    print(f"  greedy texts equal (ray vs direct, one at a time): {out['texts_equal']}/{out['texts_checked']}")
    print(f"  note: {RAY_NOTE} on the Ray path ({args.ray_num_cpus} logical CPUs given to Ray)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--parts", default="a,b", help="comma-separated: a (routing), b (overhead)")
    parser.add_argument("--base-model", type=Path, default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (for the tooling test)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    parser.add_argument("--rate", type=float, default=1.2, help="part A: requests per second (Poisson)")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("LOW", "HIGH"))
    parser.add_argument("--gpu-slots", type=int, default=8, help="per replica")
    parser.add_argument("--cpu-slots", type=int, default=112, help="per replica")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--ray-num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="part B: torch threads of the engine on both paths (default: 2, all of this machine's "
                        "cores, shared with Ray's own processes on the Ray path)")  # fmt: skip
    parser.add_argument("--check", type=int, default=24, help="part B: requests whose greedy texts are compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b"}:
        parser.error("--parts takes a, b or a,b")
    if args.tiny and args.base_model is not None:
        parser.error("--tiny and --base-model exclude each other")

    names = adapter_names(args.adapters)
    config = TraceConfig(adapters=args.adapters, popularity="zipf", alpha=args.alpha, rate=args.rate,
                         requests=args.requests, prompt_len=tuple(args.prompt_len),
                         output_len=(args.output_tokens, args.output_tokens), seed=args.seed)  # fmt: skip
    trace = generate(config)
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "trace": describe(trace)}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        if args.tiny:
            base = save_tiny_model(root / "tiny")
        else:
            base = args.base_model or ensure_embedded_model()
        write_random_adapters(root / "adapters", names, target_shapes(base, TARGETS), rank=8, alpha=16)
        engine = ["--startup-adapters", str(root / "adapters"), "--gpu-slots", str(args.gpu_slots), "--cpu-slots",
                  str(args.cpu_slots), "--max-batch-size", str(args.max_batch_size), "--max-seq-len", "512",
                  "--max-queue", str(max(256, 2 * args.requests)), "--device", "cpu"]  # fmt: skip
        print(
            f"bench_ray: model {base.name}, {args.adapters} adapters (rank 8, {'/'.join(TARGETS)}), Zipf "
            f"{args.alpha:g}; trace: {result['trace']}"
        )
        t0 = time.monotonic()
        if "a" in parts:
            result["a"] = part_a(base, root, trace, names, engine, args)
        if "b" in parts:
            result["b"] = part_b(base, root, trace, names, engine, args)
        print(f"\n{time.monotonic() - t0:.0f} s in all; {RAY_NOTE}: numbers from one shared machine")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
