"""The soak test's summary (markdown) and its place in docs/reliability.md, between the soak markers."""

import argparse
import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loadtests.common.docs_section import write_section
from loadtests.soak_payloads import KNOWN_ISSUES

if TYPE_CHECKING:
    from loadtests.soak import Soak

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "reliability.md"
SECTION = "soak"  # the markers in DOCS between which the summary goes
# Server RSS may grow this much from the end of the warm-up (the first quarter) to the end of the run; the reasoning
# is in the summary (render) and docs/reliability.md.
RSS_GROWTH_LIMIT_MIB = 64


def render(args: argparse.Namespace, soak: "Soak", memory: dict[str, float], phases: dict[str, float], checks) -> str:
    traffic = phases["traffic"]
    statuses = sorted({s for c in soak.statuses.values() for s in c}, key=lambda s: (not s.isdigit(), s))
    flags = f"--duration {args.duration:g} --concurrency {args.concurrency} --model {args.model}"
    lines = [
        "`loadtests/soak.py` starts a server process (tiny random Llama by default; `--model embedded` for SmolLM2) "
        "with API and admin keys, 2 accelerator slots, 2 CPU copies, a batch of 4 and a queue of 8, and for "
        "`--duration` seconds runs concurrent clients that mix generation (our API and the OpenAI one, streamed and "
        "not, the base and three adapters), hostile requests (one row each below), adapter uploads and deletes "
        "(during a stream with the adapter, or right after a request for it), client hang-ups and bursts of three "
        "times the queue. Every request names the statuses it may get; any other, any 5xx (a 503 with Retry-After "
        "only in a burst), or a 429 without Retry-After fails the run. Afterwards: health, the adapter list, PEFT's "
        "greedy tokens for the base and every adapter left, no file escaped an archive or a pickle, no traceback "
        f"in the server log, and server RSS at the end at most {RSS_GROWTH_LIMIT_MIB} MiB above its value after the "
        "warm-up (the first quarter, when every code path has run). Measured on the tiny model, RSS rises 15-20 MiB "
        "in the first minutes and then flattens (a 300 s run read 413, 421, 427, 428 MiB at its quarters): allocator "
        "caches and arenas settling. The limit is 3-4 times that; a two-minute run (about 3,500 requests after the "
        "warm-up) crosses it with a leak of about 20 KiB per request, e.g. one KV-cache row per request (96 KiB on "
        "the tiny model). Smaller leaks need a longer `--duration`; the quarter readings show whether RSS still "
        "climbs. `tests/tooling/test_soak.py` runs the soak for 15 s in `make test`.",
        "",
        f"Last run {datetime.date.today().isoformat()}: `python -m loadtests.soak {flags}"
        f"{' --no-keys' if args.no_keys else ''}`, {soak.requests} requests in {traffic:.0f} s "
        f"({soak.requests / max(traffic, 1e-9):.1f}/s), {sum(phases.values()):.0f} s in all ("
        + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in phases.items() if phase != "traffic")
        + "). Server RSS after each quarter of the "
        f"run: {memory['warm']:.0f}, {memory['half']:.0f}, {memory['three quarters']:.0f}, {memory['end']:.0f} MiB "
        f"({memory['peak']:.0f} MiB at most).",
        "",
        "| check | result |",
        "| --- | --- |",
        *(f"| {text} | {'pass' if ok else '**FAIL**'} |" for text, ok in checks),
        "",
        *(f"Known issue, not failed: {kind} got {status} {soak.statuses[kind][str(status)]} times: {issue}."
          for (kind, status), issue in KNOWN_ISSUES.items() if soak.statuses.get(kind, {}).get(str(status))),
        "",
        "| request kind | " + " | ".join(statuses) + " |",
        "| --- |" + " ---: |" * len(statuses),
        *(f"| {kind} | " + " | ".join(str(c.get(s, "")) for s in statuses) + " |"
          for kind, c in sorted(soak.statuses.items())),  # fmt: skip
    ]
    return "\n".join(lines)


def write_docs(summary: str) -> None:
    write_section(DOCS, SECTION, summary, heading="## Soak test")
