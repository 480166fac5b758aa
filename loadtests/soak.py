"""Soak test: a real server process on 127.0.0.1, driven for a bounded time by a mix of valid traffic (our API and the
OpenAI one, streamed and not, several adapters and the base), hostile requests, adapter uploads and deletes (some
while a request streams with the adapter), client disconnects and overload bursts. Then it checks that the server is
healthy, that its RSS did not keep growing, that exactly the accepted-and-not-deleted adapters are listed, that each
of them (and the base) still gives PEFT's greedy tokens, and that nothing escaped an archive or was unpickled.

Every request declares the statuses it may get; anything else is a failure. No 5xx is allowed except a 503 with
Retry-After during a deliberate overload burst, and every 429 must carry Retry-After.

Usage: python loadtests/soak.py [--duration 120] [--max-requests N] [--concurrency 4] [--model tiny|embedded]
                                [--no-keys] [--seed 0] [--write-docs]
Exit status 0 when every check passes. The summary (markdown) goes to stdout and, with --write-docs, into
docs/reliability.md between the soak markers. Set-up and checks add well under a minute on the tiny model.
"""

import argparse
import asyncio
import datetime
import gzip
import io
import json
import os
import pickle
import random
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.http_server import ServerProcess  # noqa: E402

API_KEY, ADMIN_KEY = "soak-api-key", "soak-admin-key"
MAX_QUEUE = 8
WORDS = "the customer asked about a refund for the delivery of an order and the pirate captain sails to sea".split()
FINISHED = ("length", "stop", "eos")
# Server RSS may grow this much from the end of the warm-up (the first quarter) to the end of the run; the reasoning
# is in the summary (render) and docs/reliability.md.
RSS_GROWTH_LIMIT_MIB = 64
# Answers that are server bugs already reported: counted and shown in the summary, not failed. Remove an entry once
# its bug is fixed.
KNOWN_ISSUES: dict[tuple[str, int], str] = {}
DOCS = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
PEFT_TOKENS = 12


# ---- what the soak sends -----------------------------------------------------------------------------------------
@dataclass
class Payloads:
    """The model, the adapters (registered at start, and sources for uploads) and prebuilt hostile bodies."""

    base_dir: Path
    stable_root: Path  # one folder per adapter registered at startup
    stable: dict[str, Path]
    churn_sources: dict[str, Path]
    max_upload_bytes: int
    escape_marker: Path  # what an unpickled file would create; zip-slip members aim next to it (escaped-*)
    zip_bomb: bytes
    pickle_bytes: bytes
    base_id: str = ""

    @classmethod
    def build(cls, work: Path, model: str) -> "Payloads":
        from transformers import AutoModelForCausalLM

        from tests.factories import ADAPTER_CONFIGS, save_peft_adapter, save_tiny_model

        if model == "tiny":
            base_dir = save_tiny_model(work / "model")
        else:
            from server.model.embedded import ensure_embedded_model

            base_dir = ensure_embedded_model()
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        stable = {f"stable-{c}": work / "stable" / f"stable-{c}" for c in "abc"}
        churn = {f"source-{c}": work / "churn" / f"source-{c}" for c in "de"}
        for i, folder in enumerate([*stable.values(), *churn.values()]):
            config = ADAPTER_CONFIGS[i if i < 3 else i + 1]  # 0, 1, 2 stay; 4, 5 come and go
            save_peft_adapter(base, folder, seed=500 + i, **config)
        del base
        # Startup adapters are held to the upload limit too.
        biggest = max((f / "adapter_model.safetensors").stat().st_size for f in [*stable.values(), *churn.values()])
        marker = work / "escaped"

        class Escape:  # unpickling this creates the marker folder: it must never happen
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("adapter_config.json", (next(iter(churn.values())) / "adapter_config.json").read_text())
            zf.writestr("adapter_model.safetensors", bytes(32 * 2**20))  # 32 MiB of zeros in ~32 KiB
        return cls(base_dir, work / "stable", stable, churn, max(2**20, 2 * biggest), marker, bomb.getvalue(),
                   pickle.dumps(Escape()))  # fmt: skip

    def files(self, folder: Path, config: bytes | None = None, weights: bytes | None = None) -> dict:
        config = config if config is not None else (folder / "adapter_config.json").read_bytes()
        weights = weights if weights is not None else (folder / "adapter_model.safetensors").read_bytes()
        return {"adapter_config": ("adapter_config.json", config),
                "adapter_model": ("adapter_model.safetensors", weights)}  # fmt: skip

    def upload_files(self, name: str, source: str) -> dict:
        return {"data": {"name": name}, "files": self.files(self.churn_sources[source])}

    def upload_archive(self, name: str, source: str) -> dict:
        return archive_upload(name, zip_of({f"save/{f.name}": f.read_bytes()
                                            for f in self.churn_sources[source].iterdir()}))  # fmt: skip

    @property
    def a_source(self) -> Path:
        return next(iter(self.churn_sources.values()))


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_gz_with_symlink(target: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        link = tarfile.TarInfo("save/adapter_model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, target
        tf.addfile(link)
    return buffer.getvalue()


def archive_upload(name: str, archive: bytes) -> dict:
    return {"data": {"name": name}, "files": {"archive": ("adapter.zip", archive)}}


def adapter_zip(p: Payloads, extra: dict[str, bytes]) -> bytes:
    return zip_of({**{f.name: f.read_bytes() for f in p.a_source.iterdir()}, **extra})


def post(path: str, **kw) -> dict:
    return {"method": "POST", "path": path, **kw}


def upload(p: Payloads, key: str = "admin", **kw) -> dict:
    return post("/v1/adapters", key=key, **kw)


async def chunked_archive(total: int):
    """A multipart upload sent with Transfer-Encoding: chunked (no Content-Length) whose archive part never ends
    before ``total`` bytes."""
    yield (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n--b\r\n'
           b'Content-Disposition: form-data; name="archive"; filename="a.zip"\r\n\r\n')  # fmt: skip
    piece = b"\0" * 2**16
    for _ in range(total // len(piece) + 1):
        yield piece
    yield b"\r\n--b--\r\n"


# (kind, statuses it may get, request). A request is the keyword arguments of Soak.call, or {"raw": bytes} for a
# request head sent on a plain socket (a Content-Length httpx would not send).
HOSTILE: list[tuple[str, set[int], Callable[[Payloads], dict]]] = [
    ("bad-json", {400, 422}, lambda p: post("/v1/generate", content=b'{"prompt": "hi", ', headers=_JSON)),
    ("not-utf8-json", {400, 422}, lambda p: post("/v1/generate", content=b"\xff\xfe{", headers=_JSON)),
    ("wrong-types", {422}, lambda p: post("/v1/generate", json={"prompt": 5, "max_new_tokens": "many"})),
    ("huge-max-new-tokens", {400, 422}, lambda p: post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 10**6})),
    ("over-schema-max", {422}, lambda p: post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 10**12})),
    ("too-many-prompt-tokens", {400}, lambda p: post("/v1/generate", json={"prompt": "refund " * 400})),
    ("oversize-body", {413}, lambda p: post("/v1/generate", json={"prompt": "x" * 100_000})),
    ("unknown-adapter", {404}, lambda p: post("/v1/generate", json={"adapter": "no-such", "prompt": "hi"})),
    ("unknown-model", {404}, lambda p: post("/v1/completions", json={"model": "no-such", "prompt": "hi"})),
    ("traversal-adapter", {404}, lambda p: post("/v1/generate", json={"adapter": "../../etc/passwd", "prompt": "x"})),
    ("traversal-url", {404}, lambda p: {"method": "GET", "path": "/v1/adapters/..%2F..%2Fetc%2Fpasswd"}),
    ("traversal-delete", {404, 405}, lambda p: {"method": "DELETE", "path": "/v1/adapters/..%2Fstable-a",
                                                 "key": "admin"}),
    ("traversal-name", {400}, lambda p: upload(p, data={"name": "../escaped"}, files=p.files(p.a_source))),
    ("dotdot-name", {400}, lambda p: upload(p, data={"name": ".."}, files=p.files(p.a_source))),
    ("oversize-upload", {413}, lambda p: upload(p, data={"name": "big"},
                                                 files=p.files(p.a_source, weights=bytes(p.max_upload_bytes + 1)))),
    ("oversize-chunked-upload", {413}, lambda p: upload(p, content=chunked_archive(2 * p.max_upload_bytes + 2**21),
                                                        headers={"content-type": "multipart/form-data; boundary=b"})),
    ("declared-huge-upload", {413}, lambda p: {"raw": b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\n"
                                                      b"Content-Length: 1000000000000\r\n\r\n"}),
    ("malformed-multipart", {400, 422}, lambda p: upload(p, content=b"--x\r\ngarbage\r\n",
                                                         headers={"content-type": "multipart/form-data; boundary=x"})),
    ("missing-files", {400}, lambda p: upload(p, data={"name": "nofiles"}, files={"unrelated": ("a", b"b")})),
    ("zip-slip", {400}, lambda p: upload(p, **archive_upload("slip", adapter_zip(p, {
        "../../escaped-slip": b"x", "save/../../../escaped-slip": b"x"})))),  # fmt: skip
    ("absolute-member", {400}, lambda p: upload(p, **archive_upload("abs", adapter_zip(
        p, {f"{p.escape_marker}-absolute": b"x"})))),  # fmt: skip
    ("tar-symlink", {400}, lambda p: upload(p, **archive_upload("link", tar_gz_with_symlink("/etc/passwd")))),
    ("zip-bomb", {400, 413}, lambda p: upload(p, **archive_upload("bomb", p.zip_bomb))),
    ("not-an-archive", {400}, lambda p: upload(p, **archive_upload("junk", os.urandom(4096)))),
    ("gzip-not-tar", {400}, lambda p: upload(p, **archive_upload("gz", gzip.compress(os.urandom(4096))))),
    ("corrupt-safetensors", {422}, lambda p: upload(p, data={"name": "corrupt"},
                                                     files=p.files(p.a_source, weights=os.urandom(5000)))),
    ("bad-config-json", {400, 422}, lambda p: upload(p, data={"name": "badcfg"},
                                                      files=p.files(p.a_source, config=b"{not json"))),
    ("pickle-weights", {422}, lambda p: upload(p, data={"name": "pickled"},
                                                files=p.files(p.a_source, weights=p.pickle_bytes))),
    ("pickle-in-archive", {422}, lambda p: upload(p, **archive_upload("pkl", adapter_zip(
        p, {"adapter_model.bin": p.pickle_bytes})))),  # fmt: skip
    ("wrong-method", {405}, lambda p: {"method": "PUT", "path": "/v1/generate"}),
    ("unknown-path", {404}, lambda p: {"method": "GET", "path": "/v1/nothing-here"}),
    ("auth-missing", {401}, lambda p: post("/v1/generate", key="none", json={"prompt": "hi"})),
    ("auth-wrong", {401}, lambda p: post("/v1/completions", key="bad", json={"model": "x", "prompt": "hi"})),
    ("auth-not-admin", {403}, lambda p: upload(p, key="api", data={"name": "x"}, files=p.files(p.a_source))),
    ("auth-delete-not-admin", {403}, lambda p: {"method": "DELETE", "path": "/v1/adapters/stable-a", "key": "api"}),
]
_JSON = {"content-type": "application/json"}


async def raw_status(url: str, head: bytes) -> int:
    """Send a request head on a plain socket and read the status code of the answer."""
    where = urlsplit(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    try:
        writer.write(head)
        await writer.drain()
        return int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    finally:
        writer.close()


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
        kind, expect, build = self.rng.choice(HOSTILE)
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

    from tests.peft_reference import PeftReference

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


def render(args: argparse.Namespace, soak: Soak, memory: dict[str, float], phases: dict[str, float], checks) -> str:
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
        "climbs. `tests/test_soak.py` runs the soak for 15 s in `make test`.",
        "",
        f"Last run {datetime.date.today().isoformat()}: `python loadtests/soak.py {flags}"
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
    text = DOCS.read_text() if DOCS.exists() else "# Reliability\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n## Soak test\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{summary}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--max-requests", type=int, default=10**9, help="stop earlier after this many requests")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients (plus overload bursts)")
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--no-keys", action="store_true", help="run the server without API keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="write the summary into docs/reliability.md")
    args = parser.parse_args(argv)
    phases: dict[str, float] = {}
    clock = time.monotonic()

    def lap(phase: str) -> None:
        nonlocal clock
        phases[phase], clock = time.monotonic() - clock, time.monotonic()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        payloads = Payloads.build(work, args.model)
        lap("set-up")
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
            lap("server start")
            memory = asyncio.run(soak.run(args.duration, args.concurrency, args.max_requests, lambda: rss_mib(pid)))
            lap("traffic")
            checks = final_checks(server, soak, payloads)
            lap("checks")
            tracebacks = server.log.read_text().count("Traceback")
            if tracebacks:
                print(server.log.read_text()[-4000:], file=sys.stderr)
        lap("server stop")
    growth = memory["end"] - memory["warm"]
    checks += [
        (f"RSS growth after the warm-up {growth:+.0f} MiB (limit {RSS_GROWTH_LIMIT_MIB})",
         growth <= RSS_GROWTH_LIMIT_MIB),
        (f"no traceback in the server log ({tracebacks})", tracebacks == 0),
        (f"every answer as expected: no 5xx, 429 with Retry-After ({len(soak.failures)} unexpected)",
         not soak.failures),
    ]  # fmt: skip
    summary = render(args, soak, memory, phases, checks)
    print(summary)
    for failure in soak.failures[:30]:
        print(f"UNEXPECTED {failure}", file=sys.stderr)
    if args.write_docs:
        write_docs(summary)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
