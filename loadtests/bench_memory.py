"""Resident memory of a real server process: after start-up and at peak under load, next to what it holds.

Starts ``lora-server serve`` (this checkout, or another one with ``--checkout DIR``, e.g. a worktree of an older
commit, for a before/after table) on the embedded model with default flags plus ``--flag`` extras, with A startup
adapters (rank 16, all attention projections), then drives C concurrent requests of P prompt tokens and N new
tokens, each on an adapter, through ``/v1/generate``. Reads VmRSS after start-up (idle) and VmHWM (the peak) from
/proc. Printed next to the model's weight bytes so the ratio idle RSS / weights is visible.

Usage: python -m loadtests.bench_memory [--checkout DIR] [--clients 64 --prompt-tokens 200 --new-tokens 64
                                        --adapters 8] [--flag=--max-batch-size=64 ...] [--json out.json]
"""

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from safetensors import safe_open

from loadtests.common.factories import target_shapes, write_random_adapters
from loadtests.common.server_process import ServerProcess
from server.model.embedded import ensure_embedded_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the model's parameters as the server holds them (float32)."""
    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += 4 * n
    return total


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkout", type=Path, default=None, help="run the server package of this checkout")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--flag", action="append", default=[], help="extra server flag (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    base_dir = ensure_embedded_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"mem-{i}" for i in range(args.adapters)]
        write_random_adapters(root / "adapters", names, target_shapes(base_dir, ATTENTION), 16, 32.0)
        flags = ["--startup-adapters", str(root / "adapters"), "--max-queue", str(4 * args.clients), *args.flag]
        server = ServerProcess(base_dir, root / "data", *flags, cwd=args.checkout)
        with server:
            assert server.proc is not None
            pid = server.proc.pid
            time.sleep(2.0)
            idle_kib = proc_kib(pid, "VmRSS")
            prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * (args.prompt_tokens // 9 + 1))

            def one(i: int) -> int:
                body = {"adapter": names[i % len(names)], "prompt": prompt, "max_new_tokens": args.new_tokens,
                        "ignore_eos": True}  # fmt: skip
                r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=600)
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                tokens = sum(pool.map(one, range(args.clients)))
            seconds = time.perf_counter() - start
            peak_kib, after_kib = proc_kib(pid, "VmHWM"), proc_kib(pid, "VmRSS")
    weights = weight_bytes(base_dir)
    figures = {
        "weights_mib": weights / 2**20,
        "idle_rss_mib": idle_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "rss_after_load_mib": after_kib / 1024,
        "idle_over_weights": idle_kib * 1024 / weights,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))


if __name__ == "__main__":
    main()
