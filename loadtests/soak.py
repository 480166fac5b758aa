"""Soak test: a real server process on 127.0.0.1, driven for a bounded time by a mix of valid traffic (our API and the
OpenAI one, streamed and not, several adapters and the base), hostile requests, adapter uploads and deletes (some
while a request streams with the adapter), client disconnects and overload bursts. Then it checks that the server is
healthy, that its RSS did not keep growing, that exactly the accepted-and-not-deleted adapters are listed, that each
of them (and the base) still gives PEFT's greedy tokens, and that nothing escaped an archive or was unpickled.

Every request declares the statuses it may get; anything else is a failure. No 5xx is allowed except a 503 with
Retry-After during a deliberate overload burst, and every 429 must carry Retry-After.

Usage: python -m loadtests.soak [--duration 120] [--max-requests N] [--concurrency 4] [--model tiny|embedded]
                                [--no-keys] [--seed 0] [--write-docs]
Exit status 0 when every check passes. The summary (markdown) goes to stdout and, with --write-docs, into
docs/reliability.md between the soak markers. Set-up and checks add well under a minute on the tiny model.
"""

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from loadtests.common.server_process import ServerProcess
from loadtests.common.timing import Laps
from loadtests.soak_hardening import HARDENING
from loadtests.soak_payloads import HOSTILE, KNOWN_ISSUES, Payloads, raw_status
from loadtests.soak_report import RSS_GROWTH_LIMIT_MIB, render, write_docs

API_KEY, ADMIN_KEY = "soak-api-key", "soak-admin-key"
MAX_QUEUE = 8
WORDS = "the customer asked about a refund for the delivery of an order and the pirate captain sails to sea".split()
FINISHED = ("length", "stop", "eos")
PEFT_TOKENS = 12
HEALTH_LIMIT_S = 1.0  # /health must answer within this while anything else runs


# ---- the traffic ---------------------------------------------------------------------------------------------------
class Soak:
    """Workers pick actions at random until the deadline; every answer is counted and checked."""

    def __init__(self, url: str, payloads: Payloads, keys: bool, rng: random.Random) -> None:
        self.url, self.payloads, self.keys, self.rng = url, payloads, keys, rng
        self.stable = sorted(payloads.stable)
        self.statuses: dict[str, Counter[str]] = {}
        self.failures: list[str] = []
        self.requests = 0
        self.kept: dict[str, str] = {}  # uploaded and not deleted: name -> churn source
        self.churned = 0
        self.health_latencies: list[float] = []  # seconds, one per /health probe during the traffic
        self.client = httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64))

    def headers(self, key: str) -> dict[str, str]:
        token = {"api": API_KEY, "admin": ADMIN_KEY, "bad": "not-a-key"}.get(key)
        return {"Authorization": f"Bearer {token}"} if self.keys and token else {}

    def record(self, kind: str, status: int | str, expect: set[int], response: httpx.Response | None = None) -> None:
        self.statuses.setdefault(kind, Counter())[str(status)] += 1
        if isinstance(status, str) or (kind, status) in KNOWN_ISSUES:
            return
        retry_after = response is not None and "retry-after" in response.headers
        body = response.text[:200] if response is not None and response.is_stream_consumed else ""
        if status >= 500 and not (status == 503 and kind == "overload" and retry_after):
            self.failures.append(f"{kind}: {status} {body}")
        elif status == 429 and not retry_after:
            self.failures.append(f"{kind}: 429 without Retry-After")
        elif status not in expect:
            self.failures.append(f"{kind}: got {status}, expected one of {sorted(expect)}: {body}")

    async def call(self, kind: str, expect: set[int], method: str, path: str, key: str = "api", **kw) -> httpx.Response:
        self.requests += 1
        headers = {**self.headers(key), **kw.pop("headers", {})}
        response = await self.client.request(method, path, headers=headers, **kw)
        self.record(kind, response.status_code, expect, response)
        return response

    async def stream(self, kind: str, path: str, body: dict, hang_up_after: int | None = None,
                     on_first: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
        """POST a streamed generation and read its events: all of them (the last JSON one must carry a finish
        reason, then ``[DONE]``), or ``hang_up_after`` of them before closing the connection."""
        self.requests += 1
        last: dict = {}
        done = False
        async with self.client.stream("POST", path, json=body, headers=self.headers("api")) as response:
            if response.status_code != 200:
                await response.aread()
            self.record(kind, response.status_code, {200, 429}, response)
            if response.status_code != 200:
                return
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if line == "data: [DONE]":
                    done = True
                    break
                last = json.loads(line[len("data: ") :])
                if events == 1 and on_first is not None:
                    await on_first()
                if hang_up_after is not None and events >= hang_up_after:
                    return  # leaving the block closes the connection mid-stream
        reason = last.get("finish_reason") or (last.get("choices") or [{}])[0].get("finish_reason")
        if reason not in FINISHED or not done:
            self.failures.append(f"{kind}: stream ended with {last} (done={done})")

    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 30)))

    def sampling(self) -> dict:
        if self.rng.random() < 0.5:
            return {}
        return {"temperature": self.rng.choice([0.3, 0.8, 1.5]), "top_p": self.rng.choice([0.5, 0.9, 1.0]),
                "seed": self.rng.randrange(1000)}  # fmt: skip

    async def generate(self) -> None:
        body = {"adapter": self.rng.choice([None, *self.stable]), "prompt": self.prompt(),
                "max_new_tokens": self.rng.randint(1, 32), "top_k": self.rng.choice([0, 0, 5])}  # fmt: skip
        body |= self.sampling()
        if self.rng.random() < 0.5:
            await self.stream("generate-stream", "/v1/generate", {**body, "stream": True})
        else:
            await self.call("generate", {200, 429}, "POST", "/v1/generate", json=body)

    async def openai(self) -> None:
        model = self.rng.choice([self.payloads.base_id, *self.stable])
        body = {"model": model, "max_tokens": self.rng.randint(1, 32), **self.sampling()}
        if self.rng.random() < 0.5:
            path, body["prompt"] = "/v1/completions", self.prompt()
        else:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": self.prompt()}]
        kind = path.rsplit("/", 1)[-1]
        if self.rng.random() < 0.5:
            await self.stream(f"{kind}-stream", path, {**body, "stream": True})
        else:
            await self.call(kind, {200, 429}, "POST", path, json=body)

    async def disconnect(self) -> None:
        """Hang up after two events of a long stream, or give up waiting for a long non-streamed answer."""
        body = {"adapter": self.rng.choice([None, *self.stable]), "prompt": self.prompt(), "max_new_tokens": 64,
                "ignore_eos": True}  # fmt: skip
        if self.rng.random() < 0.6:
            await self.stream("hang-up-stream", "/v1/generate", {**body, "stream": True}, hang_up_after=2)
            return
        self.requests += 1
        try:
            await self.client.post("/v1/generate", json=body, headers=self.headers("api"), timeout=0.3)
            self.record("hang-up-waiting", "answered first", set())
        except httpx.TimeoutException:
            self.record("hang-up-waiting", "hung up", set())

    async def churn(self) -> None:
        """Upload an adapter; keep it (at most three), or delete it while a request streams with it, or right
        after submitting a request with it. Running requests finish; later ones get 404."""
        name, source = f"churn-{self.churned}", self.rng.choice(list(self.payloads.churn_sources))
        self.churned += 1
        as_upload = self.payloads.upload_archive if self.rng.random() < 0.5 else self.payloads.upload_files
        response = await self.call("upload", {201}, "POST", "/v1/adapters", key="admin", **as_upload(name, source))
        if response.status_code != 201:
            return
        mode = self.rng.choice(["keep", "mid-stream", "mid-stream", "just-submitted"])
        if mode == "keep" and len(self.kept) < 3:
            self.kept[name] = source
            return
        body = {"adapter": name, "prompt": self.prompt(), "max_new_tokens": 24, "ignore_eos": True}

        deleted = False

        async def delete() -> None:
            nonlocal deleted
            deleted = True
            await self.call("delete", {204}, "DELETE", f"/v1/adapters/{name}", key="admin")

        if mode == "just-submitted":
            generation = asyncio.ensure_future(self.call("delete-race", {200, 404, 429}, "POST", "/v1/generate",
                                                         json=body))  # fmt: skip
            await asyncio.sleep(0.01)
            await delete()
            await generation
        else:
            await self.stream("delete-mid-stream", "/v1/generate", {**body, "stream": True}, on_first=delete)
            if not deleted:  # the stream was refused (429) before its first token
                await delete()
        await self.call("after-delete", {404, 429}, "POST", "/v1/generate", json=body)

    async def hostile(self) -> None:
        kind, expect, build = self.rng.choice(HOSTILE + HARDENING)
        if not self.keys and kind.startswith("auth-"):
            return
        request = build(self.payloads)
        if "raw" in request:
            self.requests += 1
            self.record(kind, await raw_status(self.url, request["raw"]), expect)
        else:
            await self.call(kind, expect, **request)

    async def overload(self) -> None:
        """Three times the queue's capacity of long requests at once: the excess gets 429 with Retry-After."""
        body = {"prompt": self.prompt(), "max_new_tokens": 64, "ignore_eos": True}
        burst = [self.call("overload", {200, 429}, "POST", "/v1/generate", json=body) for _ in range(3 * MAX_QUEUE)]
        for result in await asyncio.gather(*burst, return_exceptions=True):
            if isinstance(result, Exception):
                self.failures.append(f"overload: {type(result).__name__} {result}")

    async def probe_health(self, deadline: float) -> None:
        """``/health`` on a connection of its own every 0.2 s while the traffic (hostile uploads included) runs: the
        latencies show whether anything stalled the event loop."""
        async with httpx.AsyncClient(base_url=self.url, timeout=HEALTH_LIMIT_S * 5) as client:
            while time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    status = (await client.get("/health", headers=self.headers("api"))).status_code
                except httpx.TimeoutException:
                    status = 0
                self.health_latencies.append(time.monotonic() - start)
                if status != 200:
                    self.failures.append(f"health probe: {status or 'timed out'}")
                await asyncio.sleep(0.2)

    async def worker(self, deadline: float, max_requests: int) -> None:
        actions = [self.generate] * 8 + [self.openai] * 4 + [self.hostile] * 6 + [self.disconnect] * 2
        actions += [self.churn] * 2
        while time.monotonic() < deadline and self.requests < max_requests:
            action = self.rng.choice(actions)
            try:
                await action()
            except Exception as exc:  # noqa: BLE001 - a transport error is a finding, not the end of the soak
                self.failures.append(f"{action.__name__}: {type(exc).__name__} {exc}")

    async def run(self, duration: float, concurrency: int, max_requests: int, rss: Callable[[], float]) -> dict:
        """The traffic; returns RSS samples (MiB) after each quarter ("warm", "half", "three quarters", "end") and
        the "peak"."""
        start = time.monotonic()
        deadline = start + duration
        tasks = [asyncio.ensure_future(self.worker(deadline, max_requests)) for _ in range(concurrency)]
        tasks.append(asyncio.ensure_future(self.probe_health(deadline)))
        next_burst = start + min(10.0, duration / 3)
        memory: dict[str, float] = {"peak": 0.0}
        while not all(t.done() for t in tasks):
            now = time.monotonic()
            memory["peak"] = max(memory["peak"], rss())
            for quarter, mark in ((1, "warm"), (2, "half"), (3, "three quarters")):
                if mark not in memory and now >= start + duration * quarter / 4:
                    memory[mark] = rss()
            if next_burst <= now < deadline - 5 and self.requests < max_requests:
                next_burst = now + 20
                tasks.append(asyncio.ensure_future(self.overload()))
            await asyncio.sleep(0.5)
        memory["end"] = rss()
        for mark in ("warm", "half", "three quarters"):
            memory.setdefault(mark, memory["end"])
        for task in tasks:
            if task.exception() is not None:
                self.failures.append(f"worker crashed: {task.exception()!r}")
        await self.client.aclose()
        return memory


# ---- after the traffic ---------------------------------------------------------------------------------------------
def final_checks(server: ServerProcess, soak: Soak, payloads: Payloads) -> list[tuple[str, bool]]:
    import torch
    from transformers import AutoTokenizer

    from loadtests.common.peft_reference import PeftReference

    headers = soak.headers("api")

    def get(path: str) -> httpx.Response:
        return httpx.get(f"{server.url}{path}", headers=headers, timeout=30)

    checks = [("/health, /ready and /metrics answer 200 after the soak",
               all(get(p).status_code == 200 for p in ("/health", "/ready", "/metrics")))]  # fmt: skip
    listed = {a["name"] for a in get("/v1/adapters").json()["adapters"]}
    expected = set(payloads.stable) | set(soak.kept)
    difference = "".join(f" (missing {sorted(expected - listed)})" if expected - listed else "")
    difference += f" (unexpected {sorted(listed - expected)})" if listed - expected else ""
    checks.append((f"exactly the {len(expected)} accepted, not deleted adapters are listed{difference}",
                   listed == expected))  # fmt: skip
    escaped = sorted(str(f) for f in payloads.escape_marker.parent.rglob("escaped*"))
    found = f": {escaped}" if escaped else ""
    checks.append((f"no archive member escaped, no pickle was loaded{found}", not escaped))

    folders = {**payloads.stable, **{n: payloads.churn_sources[s] for n, s in soak.kept.items()}}
    names = sorted(folders)
    reference = PeftReference(payloads.base_dir, [folders[n] for n in names])
    tokenizer = AutoTokenizer.from_pretrained(payloads.base_dir)
    prompt = "the customer asked about a refund"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    mismatched = []
    greedy = {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": PEFT_TOKENS,
              "eos_token_id": None, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    for index, name in [(None, None), *enumerate(names)]:
        with torch.inference_mode():
            if index is None:
                with reference.model.disable_adapter():
                    out = reference.model.generate(input_ids=ids, **greedy)
            else:
                reference.model.set_adapter(reference.names[index])
                out = reference.model.generate(input_ids=ids, **greedy)
        expected_text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        body = {"adapter": name, "prompt": prompt, "max_new_tokens": PEFT_TOKENS, "ignore_eos": True}
        answer = httpx.post(f"{server.url}/v1/generate", json=body, headers=headers, timeout=60)
        if answer.status_code != 200 or answer.json()["text"] != expected_text:
            mismatched.append(name or "base")
    checks.append((f"PEFT's greedy tokens from the base and all {len(names)} adapters"
                   + (f" (mismatch: {', '.join(mismatched)})" if mismatched else ""), not mismatched))  # fmt: skip
    return checks


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--max-requests", type=int, default=10**9, help="stop earlier after this many requests")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients (plus overload bursts)")
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--no-keys", action="store_true", help="run the server without API keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="write the summary into docs/reliability.md")
    args = parser.parse_args(argv)
    laps = Laps()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        payloads = Payloads.build(work, args.model)
        laps.lap("set-up")
        flags = ["--gpu-slots", "2", "--cpu-slots", "2", "--max-batch-size", "4", "--max-queue", str(MAX_QUEUE),
                 "--max-seq-len", "256", "--max-new-tokens", "64", "--max-prompt-tokens", "128",
                 "--max-upload-bytes", str(payloads.max_upload_bytes), "--max-request-bytes", "65536",
                 "--request-timeout", "60", "--startup-adapters", str(payloads.stable_root)]  # fmt: skip
        if not args.no_keys:
            flags += ["--api-key", API_KEY, "--admin-key", ADMIN_KEY]
        with ServerProcess(payloads.base_dir, work / "store", *flags) as server:
            assert server.proc is not None
            pid = server.proc.pid
            soak = Soak(server.url, payloads, not args.no_keys, random.Random(args.seed))
            payloads.base_id = httpx.get(f"{server.url}/v1/models", headers=soak.headers("api")).json()["data"][0]["id"]
            laps.lap("server start")
            memory = asyncio.run(soak.run(args.duration, args.concurrency, args.max_requests, lambda: rss_mib(pid)))
            laps.lap("traffic")
            checks = final_checks(server, soak, payloads)
            laps.lap("checks")
            tracebacks = server.log.read_text().count("Traceback")
            if tracebacks:
                print(server.log.read_text()[-4000:], file=sys.stderr)
        laps.lap("server stop")
    growth = memory["end"] - memory["warm"]
    checks += [
        (f"RSS growth after the warm-up {growth:+.0f} MiB (limit {RSS_GROWTH_LIMIT_MIB})",
         growth <= RSS_GROWTH_LIMIT_MIB),
        (f"no traceback in the server log ({tracebacks})", tracebacks == 0),
        (f"/health answered within {HEALTH_LIMIT_S:g} s all through the traffic ({len(soak.health_latencies)} probes, "
         f"slowest {max(soak.health_latencies, default=0):.2f} s)",
         bool(soak.health_latencies) and max(soak.health_latencies) < HEALTH_LIMIT_S),
        (f"every answer as expected: no 5xx, 429 with Retry-After ({len(soak.failures)} unexpected)",
         not soak.failures),
    ]  # fmt: skip
    summary = render(args, soak, memory, laps.phases, checks)
    print(summary)
    for failure in soak.failures[:30]:
        print(f"UNEXPECTED {failure}", file=sys.stderr)
    if args.write_docs:
        write_docs(summary)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
