"""Micro-benchmark: CPU decode attention of one layer, the old contiguous-row path against the paged kernels.

The old path (before the paged cache) kept each sequence in its own row of a [rows, KV, max_len, D] cache and ran
grouped matmul attention on a view of it; it is rebuilt here. The new paths read a block pool through block tables:
the C kernel (``native``) and the torch gather fallback (``torch``). SmolLM2-135M shapes (H=9, KV=3, D=64), block
size 16, block tables shuffled, in float32 or bfloat16 storage (``--dtype``; the C kernel serves both). Prints ms
per layer and the old/new ratio (> 1: the new path is faster).

Usage: python -m loadtests.bench_paged_attention [--rows 32 128] [--keys 300 1000] [--repeats 30] [--dtype bfloat16]
"""

import argparse
import time
from collections.abc import Callable

import torch

from server.kernels.attention.native import native_decode_usable, paged_decode_native
from server.kernels.attention.reference import paged_decode_reference

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def old_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The pre-paging CPU decode: q [W, H, 1, D], k/v [W, KV, L, D] views of the row cache, mask [W, 1, 1, L]."""
    rows, heads, _, dim = q.shape
    scores = torch.matmul(q.view(rows, KV_HEADS, heads // KV_HEADS, dim), k.transpose(-1, -2))
    scores.mul_(scale).masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v).view(rows, heads, 1, dim)


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function over ``repeats`` calls, after three warm-up calls. The functions take
    turns call by call, so load from other processes falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for attempt in range(repeats + 3):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if attempt >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}


def bench(rows: int, keys: int, repeats: int, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    g = torch.Generator().manual_seed(rows + keys)
    scale = DIM**-0.5
    max_len = keys + 64  # the old cache reserved max_len per row; the view reads :keys
    old_k = torch.randn(rows, KV_HEADS, max_len, DIM, generator=g).to(dtype)
    old_v = torch.randn(rows, KV_HEADS, max_len, DIM, generator=g).to(dtype)
    q = torch.randn(rows, HEADS, DIM, generator=g).to(dtype)
    mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    per_row = -(-keys // BLOCK)
    num_blocks = rows * per_row + 8
    tables = torch.randperm(num_blocks, generator=g)[: rows * per_row].view(rows, per_row).to(torch.int32)
    k_pool = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g).to(dtype)
    ctx = torch.full((rows,), keys, dtype=torch.int32)
    out = torch.empty_like(q)
    ks, vs = old_k[:, :, :keys], old_v[:, :, :keys]
    fns: dict[str, Callable[[], object]] = {
        "old": lambda: old_contiguous(q.unsqueeze(2), ks, vs, mask, scale),
        "torch": lambda: paged_decode_reference(out, q, k_pool, v_pool, tables, ctx, keys, scale),
    }
    if native_decode_usable(dtype):
        fns["native"] = lambda: paged_decode_native(out, q, k_pool, v_pool, tables, ctx, keys, scale)
    results = timed(fns, repeats)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--keys", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    print(
        f"threads={torch.get_num_threads()}  H={HEADS} KV={KV_HEADS} D={DIM} block={BLOCK}  {args.dtype}"
        "  ms per layer (median)"
    )
    for rows in args.rows:
        for keys in args.keys:
            r = bench(rows, keys, args.repeats, dtype)
            ratios = "  ".join(f"old/{name}={r['old'] / r[name]:.2f}x" for name in ("torch", "native") if name in r)
            figures = "  ".join(f"{name}={ms:.3f}" for name, ms in r.items())
            print(f"rows={rows:4d} keys={keys:5d}  {figures}  {ratios}")


if __name__ == "__main__":
    main()
