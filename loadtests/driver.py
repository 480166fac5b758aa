"""Open-loop HTTP load driver: replays a trace (loadtests.trace) against a server and times every token.

Each request is sent at its arrival time whatever the server is doing (open loop, as S-LoRA and vLLM's
benchmark_serving measure), with streaming on, through one of two APIs:
  generate  our ``POST /v1/generate`` (SSE: one ``token`` event per token, then a final event with ``usage``)
  openai    ``POST /v1/completions`` with ``stream: true``; the adapter goes in ``model`` (the base model's id for
            requests without one, from ``GET /v1/models`` unless ``--base-model`` names it), so the same trace runs
            against vLLM or LoRAX. ``stream_options.include_usage`` is asked for (vLLM answers with token counts;
            otherwise every chunk with a choice counts as one token).
``ignore_eos`` is sent in both (vLLM accepts it as an extra field) so output lengths follow the trace.

Per request: TTFT = first token - send; TPOT = (last token - first token) / (output tokens - 1); ITL = gaps
between token events. Report (loadtests.driver_report): throughput (ok requests/s and output tokens/s over the time
from the first send to the last answer), TTFT/TPOT/ITL/latency mean and p50/p90/p99, errors by status
(``stream:<type>`` for streams that ended with an error, ``connect``/``read`` etc. for transport failures) and SLO
attainment (fraction of all requests answered with a first token within ``--slo-ttft``).

Usage: python -m loadtests.driver --trace t.jsonl --url http://127.0.0.1:8000 [--api generate|openai]
           [--slo-ttft 1.0] [--json out.json] [--rates 1,2,4 --plot sweep.png]
With ``--rates`` the trace is replayed once per rate, its arrival times scaled to that rate, and a PNG of latency
vs request rate is written (needs matplotlib: ``pip install -e '.[bench]'``; without it the plot is skipped).
"""

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx

from loadtests.driver_report import format_summary, format_sweep, plot_sweep, request_row, summarize
from loadtests.trace import TraceRequest, load, offered_rate, prompt_text, scale_to_rate

Api = Literal["generate", "openai"]


@dataclass(frozen=True)
class Target:
    """Where and how to send: ``base_model`` is the OpenAI ``model`` for requests without an adapter."""

    url: str
    api: Api = "generate"
    base_model: str | None = None
    api_key: str | None = None
    ignore_eos: bool = True
    timeout: float = 600.0


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds, ``sent``/``end`` from the start of the replay, token times
    from the request's own send."""

    index: int
    adapter: str | None
    scheduled: float
    max_new_tokens: int
    sent: float = 0.0
    end: float | None = None
    status: int | None = None
    error: str | None = None  # None when the request was answered in full
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def tpot(self) -> float | None:
        if len(self.token_times) < 1 or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    def error_key(self) -> str:
        if self.status is not None and self.status != 200:
            return str(self.status)
        return self.error or "unknown"


def _body(target: Target, req: TraceRequest, prompt: str) -> tuple[str, dict[str, Any]]:
    if target.api == "generate":
        body: dict[str, Any] = {"adapter": req.adapter, "prompt": prompt, "max_new_tokens": req.max_new_tokens,
                                "stream": True, "temperature": 0.0, "ignore_eos": target.ignore_eos}  # fmt: skip
        return "/v1/generate", body
    model = req.adapter if req.adapter is not None else target.base_model
    body = {"model": model, "prompt": prompt, "max_tokens": req.max_new_tokens, "stream": True, "temperature": 0.0,
            "ignore_eos": target.ignore_eos, "stream_options": {"include_usage": True}}  # fmt: skip
    return "/v1/completions", body


def _on_event(record: RequestRecord, api: Api, event: dict[str, Any], at: float, counted: list[int]) -> None:
    """Fold one SSE event into the record; ``counted[0]`` counts token events (used when no usage comes)."""
    if "error" in event and api == "openai":
        record.error = f"stream:{event['error'].get('type', 'error')}"
        return
    if api == "generate":
        token = event.get("token")
        if token is not None and token.get("id", -1) != -1:  # id -1: a text flush riding on the final event
            record.token_times.append(at)
            counted[0] += 1
        if event.get("finish_reason") is not None:
            record.finish_reason = event["finish_reason"]
            if record.finish_reason in ("timeout", "error"):
                record.error = f"stream:{record.finish_reason}"
    else:
        choices = event.get("choices") or []
        if choices:
            record.token_times.append(at)
            counted[0] += 1
            record.finish_reason = choices[0].get("finish_reason") or record.finish_reason
    usage = event.get("usage")
    if usage:
        record.output_tokens = int(usage.get("completion_tokens", 0))
        record.prompt_tokens = usage.get("prompt_tokens")


async def send(client: httpx.AsyncClient, target: Target, record: RequestRecord, prompt: str, t0: float,
               req: TraceRequest) -> RequestRecord:  # fmt: skip
    """Send one request, stream its answer and fill ``record`` (never raises for HTTP or transport errors)."""
    path, body = _body(target, req, prompt)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    counted, done = [0], False
    start = time.perf_counter()
    record.sent = start - t0
    try:
        async with client.stream("POST", target.url + path, json=body, headers=headers) as response:
            record.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                record.error = _error_type(response)
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                _on_event(record, target.api, json.loads(payload), time.perf_counter() - start, counted)
        if record.output_tokens == 0:
            record.output_tokens = counted[0]
        if not done and record.error is None:
            record.error = "stream:incomplete"  # the server closed the stream without its [DONE]
    except httpx.HTTPError as exc:
        record.error = type(exc).__name__
    finally:
        record.end = time.perf_counter() - t0
    return record


def _error_type(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return f"http {response.status_code}"


async def replay(
    trace: Sequence[TraceRequest], target: Target, prompt_seed: int = 0
) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time; returns the records and the seconds from start to the last answer."""
    prompts = [prompt_text(r, i, prompt_seed) for i, r in enumerate(trace)]  # built before the clock starts
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(target.timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        if target.api == "openai" and target.base_model is None and any(r.adapter is None for r in trace):
            target = replace(target, base_model=await base_model_id(client, target))
        t0 = time.perf_counter()

        async def one(i: int, req: TraceRequest) -> RequestRecord:
            delay = t0 + req.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(i, req.adapter, req.arrival, req.max_new_tokens)
            return await send(client, target, record, prompts[i], t0, req)

        records = await asyncio.gather(*(one(i, r) for i, r in enumerate(trace)))
        elapsed = time.perf_counter() - t0
    ends = [r.end for r in records if r.end is not None]
    return list(records), max(ends) if ends else elapsed


async def base_model_id(client: httpx.AsyncClient, target: Target) -> str:
    """The first model of ``GET /v1/models`` (the base model, for our server and vLLM)."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    response = await client.get(target.url + "/v1/models", headers=headers)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def run(trace: Sequence[TraceRequest], target: Target, slo_ttft: float = 1.0,
        prompt_seed: int = 0) -> tuple[dict[str, Any], list[RequestRecord]]:  # fmt: skip
    """Replay ``trace`` and summarize it (blocking)."""
    records, elapsed = asyncio.run(replay(trace, target, prompt_seed))
    summary = summarize(records, elapsed, slo_ttft)
    summary["offered_rate"] = offered_rate(trace)
    return summary, records


def sweep(trace: Sequence[TraceRequest], rates: Sequence[float], target: Target, slo_ttft: float = 1.0,
          prompt_seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """One replay per rate, the trace's arrival times scaled to that rate; one summary each, with ``rate``."""
    out = []
    for rate in rates:
        summary, _ = run(scale_to_rate(trace, rate), target, slo_ttft, prompt_seed)
        out.append({"rate": rate, **summary})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.driver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, required=True, help="JSONL trace from loadtests.trace")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api", choices=("generate", "openai"), default="generate")
    parser.add_argument("--base-model", default=None, help="OpenAI model id for requests without an adapter")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--requests", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at end-of-sequence")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--prompt-seed", type=int, default=0, help="for traces saved without prompt texts")
    parser.add_argument("--rates", default=None, help="comma-separated request rates: a sweep")
    parser.add_argument("--plot", type=Path, default=None, help="sweep PNG (default: sweep.png)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    trace = load(args.trace)[: args.requests]
    if not trace:
        parser.error("the trace is empty")
    target = Target(args.url.rstrip("/"), args.api, args.base_model, args.api_key, not args.no_ignore_eos,
                    args.timeout)  # fmt: skip
    if args.rates:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
        summaries = sweep(trace, rates, target, args.slo_ttft, args.prompt_seed)
        print(format_sweep(summaries))
        plot = args.plot or Path("sweep.png")
        if plot_sweep(summaries, plot, f"{len(trace)} requests, {args.api} API, {args.url}"):
            print(f"plot: {plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        result: dict[str, Any] = {"api": args.api, "url": args.url, "sweep": summaries}
    else:
        summary, records = run(trace, target, args.slo_ttft, args.prompt_seed)
        print(format_summary(summary))
        result = {"api": args.api, "url": args.url, "summary": summary, "requests": [request_row(r) for r in records]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
