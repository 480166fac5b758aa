"""One call that validates the GPU path: every CUDA test, then ``loadtests.bench_gpu``, in under 8 minutes.

Whoever gets a GPU runs ``make gpu-check`` (or ``python -m loadtests.gpu_check``) and gets a summary: the CUDA tests
(the Triton kernels against the torch reference on Llama-3-8B layer shapes, float16/bfloat16/float32, every step
layout) and the benchmark's micro (one LoRA add per op and layer shape) and decode (tokens/s against the plain
model) figures. Once the tests pass there, ``TRITON_VALIDATED_ON_GPU`` in ``server/kernels/select.py`` can be set
and the figures go into docs/benchmarks.md. Without CUDA it says so and exits 0: there is nothing to check.

Usage: python -m loadtests.gpu_check [--json summary.json] [--budget 480]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Every test that needs CUDA. The interpreter suites are left out: they run the kernels on the CPU.
CUDA_TESTS = ["tests/model/test_triton_ops.py", "tests/model/test_triton_attention.py"]
CUDA_TEST_FILTER = "not interpreter_suite and not interp_"
# (label, bench_gpu arguments, share of what is left of the budget): micro first, it is the cheaper one.
BENCHES = [
    ("micro", ["--micro", "--rounds", "2", "--calls", "10"], 0.4),
    ("decode", ["--batch", "32", "--prompt", "64", "--new-tokens", "32", "--rounds", "2"], 1.0),
]
TEST_SHARE = 0.55  # of the budget, for the tests (Triton compiles each kernel variant on first use)


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Exit status (None when it ran out of time), the output, and the seconds it took."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1.0))
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return None, out, time.perf_counter() - start


def _pytest_counts(output: str) -> dict[str, int]:
    """passed / failed / skipped / error counts from pytest's last summary line."""
    counts: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", line)
        if found:
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
            break
    return counts


def _bench_summary(label: str, payload: dict[str, Any]) -> list[str]:
    results = payload.get("results", {})
    lines: list[str] = []
    if label == "micro":
        for case, fig in results.items():
            timing = {op: t["wall"] for op, t in fig["us_per_call"].items()}
            errors = fig["max_abs_err_vs_fp32_reference"]
            cells = "  ".join(f"{op} {us:.0f}us" for op, us in timing.items())
            worst = max(errors.values()) if errors else float("nan")
            lines.append(f"    {case}: {cells}  (max err {worst:.1e})")
    else:
        for batch, fig in results.get("batches", {}).items():
            ratios = "  ".join(f"{n} {r:.2f}x" for n, r in fig["ratio_to_plain"].items() if n != "plain")
            lines.append(f"    batch {batch}: tokens/s vs plain: {ratios}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    import torch  # after argument parsing, so --help works anywhere

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a machine with an NVIDIA GPU.")  # fmt: skip
        return 0
    from server.kernels.triton.ops import TRITON_AVAILABLE

    device = torch.cuda.get_device_name(0)
    print(
        f"gpu-check on {device}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"triton {'installed' if TRITON_AVAILABLE else 'NOT installed'}; budget {args.budget:.0f} s",
        flush=True,
    )
    deadline = time.perf_counter() + args.budget
    summary: dict[str, Any] = {"device": device, "torch": torch.__version__, "triton": TRITON_AVAILABLE}

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "-k", CUDA_TEST_FILTER,
           *CUDA_TESTS]  # fmt: skip
    status, output, seconds = _run(cmd, args.budget * TEST_SHARE)
    counts = _pytest_counts(output)
    tests_ok = status == 0 and counts.get("passed", 0) > 0
    summary["tests"] = {"status": status, "seconds": round(seconds, 1), "counts": counts, "ok": tests_ok}
    print(f"  CUDA tests: {'PASS' if tests_ok else 'FAIL'} {counts} in {seconds:.0f} s"
          + (" (ran out of time)" if status is None else ""), flush=True)  # fmt: skip
    if not tests_ok:
        print("\n".join(output.splitlines()[-60:]))

    summary["bench"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, bench_args, share in BENCHES:
            left = (deadline - time.perf_counter()) * share
            out = Path(tmp) / f"{label}.json"
            cmd = [sys.executable, "-m", "loadtests.bench_gpu", *bench_args, "--json", str(out)]
            status, output, seconds = _run(cmd, left)
            ok = status == 0 and out.is_file()
            payload = json.loads(out.read_text()) if ok else {}
            summary["bench"][label] = {"status": status, "seconds": round(seconds, 1), "ok": ok, **payload}
            print(f"  bench_gpu {label}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s"
                  + (" (ran out of time)" if status is None else ""), flush=True)  # fmt: skip
            if ok:
                print("\n".join(_bench_summary(label, payload)))
            else:
                print("\n".join(output.splitlines()[-30:]))
    benches_ok = all(b["ok"] for b in summary["bench"].values())
    summary["ok"] = tests_ok and benches_ok
    print(
        f"gpu-check: {'PASS' if summary['ok'] else 'FAIL'} (tests {'pass' if tests_ok else 'FAIL'}, "
        f"bench {'ok' if benches_ok else 'FAILED'}) in {args.budget - (deadline - time.perf_counter()):.0f} s"
    )
    if tests_ok:
        print("  the Triton kernels pass on this GPU: TRITON_VALIDATED_ON_GPU in server/kernels/select.py may be set")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
