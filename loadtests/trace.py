"""Synthetic multi-adapter request traces, modelled on S-LoRA's workload generator (benchmarks/trace.py there).

A trace is a list of ``TraceRequest`` sorted by arrival time:
  adapters    N adapters named ``a0000``, ``a0001``, ... (``adapter_names``); a ``base_fraction`` of the requests
              (and all of them when N = 0) go to the base model (adapter ``None``)
  popularity  which adapter a request names, by inverse CDF of one uniform draw u per request:
                power    S-LoRA's law: index = floor(N * u ** (1 / alpha)), P(i) = ((i+1)/N)^alpha - (i/N)^alpha;
                         alpha = 1 is uniform, smaller alpha piles the requests onto the first adapters
                zipf     P(i) proportional to (i + 1) ** -alpha (rank-frequency power law, as in bench_engine.py)
                uniform  P(i) = 1 / N
  arrivals    a Gamma renewal process: inter-arrival gaps ~ Gamma(shape 1/cv^2, scale cv^2/rate), so the mean gap
              is 1/rate and the gaps' coefficient of variation is cv (cv = 1: Poisson; cv = 0: evenly spaced)
  lengths     prompt and output lengths uniform over inclusive ranges (default 8..512 each, as S-LoRA)
  prompts     words drawn from a fixed vocabulary whose every word is one token (with its leading space) in
              Llama-family BPE tokenizers, so a prompt of n words is about n tokens; ``prompt_len`` records n

Each aspect draws from its own random stream seeded from ``seed``, so the same seed gives the same trace, and
changing one aspect (say, the number of adapters) leaves the others (arrivals, lengths, prompts) unchanged.

JSONL, one request per line: ``{"arrival": s, "adapter": "a0003" | null, "prompt_len": n, "max_new_tokens": m,
"prompt": "..."}``; ``prompt`` may be left out, and is then rebuilt from ``prompt_len`` and the line number.

Usage: python -m loadtests.trace --adapters 100 --rate 5 --duration 60 --out t.jsonl
           [--popularity power|zipf|uniform --alpha 1 --cv 1 --prompt-len 8 512 --output-len 8 512 --seed 0]
Torch-free: standard library only.
"""

import argparse
import bisect
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

Popularity = Literal["power", "zipf", "uniform"]
POPULARITIES: tuple[str, ...] = ("power", "zipf", "uniform")

# Each of these is a single token, with its leading space, for SmolLM2's and Llama's BPE tokenizers (checked: 512
# words from this list encode to exactly 512 SmolLM2 tokens).
WORDS: tuple[str, ...] = tuple(
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by word but "
    "what some we can out other were all there when up use your how said an each she which do their time if will way "
    "about many then them write would like so these her long make thing see him two has look more day could go come "
    "did number sound no most people my over know water than call first who may down side been now find".split()
)


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace. ``arrival``: seconds from the start of the replay; ``adapter``: None = base model;
    ``prompt_len``: the wanted prompt length in tokens (words); ``prompt``: its text, or None to build it on demand."""

    arrival: float
    adapter: str | None
    prompt_len: int
    max_new_tokens: int
    prompt: str | None = None


@dataclass(frozen=True)
class TraceConfig:
    """What to generate; ``requests`` (when set) overrides ``int(rate * duration)``. Ranges are inclusive."""

    adapters: int = 100
    popularity: Popularity = "power"
    alpha: float = 1.0
    rate: float = 2.0
    cv: float = 1.0
    duration: float = 60.0
    requests: int | None = None
    prompt_len: tuple[int, int] = (8, 512)
    output_len: tuple[int, int] = (8, 512)
    base_fraction: float = 0.0
    seed: int = 0
    text: bool = True  # materialize prompt texts (False: leave them to ``prompt_text``, e.g. for huge traces)

    def __post_init__(self) -> None:
        if self.adapters < 0 or self.rate <= 0 or self.cv < 0 or self.duration <= 0:
            raise ValueError("adapters must be >= 0, rate > 0, cv >= 0, duration > 0")
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {', '.join(POPULARITIES)}")
        if self.popularity != "uniform" and self.alpha <= 0:
            raise ValueError("alpha must be > 0")
        for lo, hi in (self.prompt_len, self.output_len):
            if not 1 <= lo <= hi:
                raise ValueError("length ranges need 1 <= low <= high")
        if not 0.0 <= self.base_fraction <= 1.0:
            raise ValueError("base_fraction must be in [0, 1]")

    @property
    def num_requests(self) -> int:
        return self.requests if self.requests is not None else int(self.rate * self.duration)


def adapter_names(count: int, prefix: str = "a") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(count)]


def popularity_probabilities(count: int, popularity: Popularity, alpha: float = 1.0) -> list[float]:
    """P(request names adapter i) for i in 0..count-1, exactly as ``generate`` draws them."""
    if popularity == "uniform":
        return [1.0 / count] * count
    if popularity == "power":
        return [((i + 1) / count) ** alpha - (i / count) ** alpha for i in range(count)]
    weights = [(i + 1) ** -alpha for i in range(count)]
    total = sum(weights)
    return [w / total for w in weights]


def _pick(u: float, count: int, popularity: Popularity, alpha: float, cumulative: list[float]) -> int:
    """Inverse CDF of the popularity law at u in [0, 1)."""
    if popularity == "power":
        return min(count - 1, int(count * u ** (1.0 / alpha)))
    if popularity == "uniform":
        return min(count - 1, int(count * u))
    return min(count - 1, bisect.bisect_right(cumulative, u * cumulative[-1]))


def gaps(rate: float, cv: float, count: int, rng: random.Random) -> list[float]:
    """``count`` inter-arrival gaps with mean 1/rate and coefficient of variation cv (Gamma; cv = 0: constant)."""
    if cv == 0:
        return [1.0 / rate] * count
    shape, scale = 1.0 / (cv * cv), cv * cv / rate
    return [rng.gammavariate(shape, scale) for _ in range(count)]


def make_prompt(length: int, rng: random.Random) -> str:
    """``length`` words from WORDS (about ``length`` tokens)."""
    return " ".join(rng.choices(WORDS, k=length))


def prompt_text(request: TraceRequest, index: int, seed: int = 0) -> str:
    """The request's prompt, built deterministically from (seed, index) when the trace does not carry it."""
    if request.prompt is not None:
        return request.prompt
    return make_prompt(request.prompt_len, random.Random(f"{seed}:prompt:{index}"))


def generate(config: TraceConfig) -> list[TraceRequest]:
    """The trace described by ``config`` (same config, same trace)."""
    n, seed = config.num_requests, config.seed
    streams = {k: random.Random(f"{seed}:{k}") for k in ("arrival", "adapter", "base", "prompt_len", "output_len")}
    names = adapter_names(config.adapters)
    cumulative: list[float] = []
    if config.popularity == "zipf" and names:
        weights = popularity_probabilities(len(names), "zipf", config.alpha)
        cumulative = list(itertools.accumulate(weights))
    clock, out = 0.0, []
    for i, gap in enumerate(gaps(config.rate, config.cv, n, streams["arrival"])):
        clock += gap  # as S-LoRA: the first request arrives one gap after the start
        u, b = streams["adapter"].random(), streams["base"].random()  # both drawn always: streams stay aligned
        adapter = None
        if names and b >= config.base_fraction:
            adapter = names[_pick(u, len(names), config.popularity, config.alpha, cumulative)]
        prompt_len = streams["prompt_len"].randint(*config.prompt_len)
        request = TraceRequest(clock, adapter, prompt_len, streams["output_len"].randint(*config.output_len))
        out.append(replace(request, prompt=prompt_text(request, i, seed)) if config.text else request)
    return out


def offered_rate(trace: Sequence[TraceRequest]) -> float:
    """Requests per second the trace offers: n / arrival time of the last request."""
    if not trace or trace[-1].arrival <= 0:
        return math.inf
    return len(trace) / trace[-1].arrival


def scale_to_rate(trace: Sequence[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same requests with arrival times stretched so that ``offered_rate`` becomes ``rate``."""
    factor = offered_rate(trace) / rate
    return [replace(r, arrival=r.arrival * factor) for r in trace]


def save(trace: Iterable[TraceRequest], path: Path, with_text: bool = True) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in trace:
            row = asdict(r)
            if not with_text or row["prompt"] is None:
                del row["prompt"]
            f.write(json.dumps(row) + "\n")


def load(path: Path) -> list[TraceRequest]:
    """A JSONL trace, sorted by arrival (``prompt`` is optional on every line)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(TraceRequest(float(row["arrival"]), row.get("adapter"), int(row["prompt_len"]),
                                    int(row["max_new_tokens"]), row.get("prompt")))  # fmt: skip
    return sorted(out, key=lambda r: r.arrival)


def describe(trace: Sequence[TraceRequest]) -> str:
    counts = Counter(r.adapter for r in trace if r.adapter is not None)
    top = ", ".join(f"{name} {c}" for name, c in counts.most_common(3))
    base = sum(1 for r in trace if r.adapter is None)
    span = trace[-1].arrival if trace else 0.0
    return (f"{len(trace)} requests over {span:.1f} s ({offered_rate(trace):.2f} req/s), {len(counts)} distinct "
            f"adapters ({top}), {base} on the base model, prompt tokens {sum(r.prompt_len for r in trace)}, "
            f"output tokens {sum(r.max_new_tokens for r in trace)}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.trace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--popularity", choices=POPULARITIES, default="power")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (power: 1 = uniform)")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival gaps")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds; requests = int(rate * duration)")
    parser.add_argument("--requests", type=int, default=None, help="number of requests (overrides --duration)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(8, 512), metavar=("LOW", "HIGH"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(8, 512), metavar=("LOW", "HIGH"))
    parser.add_argument("--base-fraction", type=float, default=0.0, help="share of requests on the base model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-text", action="store_true", help="store prompt lengths only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = TraceConfig(
        adapters=args.adapters, popularity=args.popularity, alpha=args.alpha, rate=args.rate, cv=args.cv,
        duration=args.duration, requests=args.requests, prompt_len=tuple(args.prompt_len),
        output_len=tuple(args.output_len), base_fraction=args.base_fraction, seed=args.seed, text=not args.no_text,
    )  # fmt: skip
    trace = generate(config)
    save(trace, args.out)
    print(f"{args.out}: {describe(trace)}")


if __name__ == "__main__":
    main()
