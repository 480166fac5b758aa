"""The Ray-free parts of ``server/deploy``: routing ids, forwarding through the ASGI app, merged metrics, settings.

The Ray application itself runs in tests/e2e/test_ray_serve.py."""

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

import server.deploy.directory as directory_module
from server.deploy.directory import STALE_AFTER_S, ReplicaDirectory, ReplicaReport
from server.deploy.forwarding import ForwardedRequest, ResponseStart, call_asgi
from server.deploy.ray_settings import RaySettings, settings_from_args
from server.deploy.replica_metrics import merge_expositions, registry_for
from server.deploy.routing import adapter_names, routing_id

BASE = "SmolLM2-135M-Instruct"


def _rid(path: str, body: object, method: str = "POST") -> str | None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return routing_id(method, path, raw, BASE)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/generate", {"prompt": "x", "adapter": "legal-v2"}, "legal-v2"),
        ("/v1/generate", {"prompt": "x"}, BASE),
        ("/v1/generate", {"prompt": "x", "adapter": None}, BASE),
        ("/v1/completions", {"prompt": "x", "model": "support-fr"}, "support-fr"),
        ("/v1/completions", {"prompt": "x", "model": BASE}, BASE),
        ("/v1/chat/completions", {"messages": [], "model": "a"}, "a"),
        # A mixture has one id whichever way it is written: the engine's canonical key.
        ("/v1/generate", {"adapter": {"mix": [{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.3}]}},
         "mix:a*0.7+b*0.3"),
        ("/v1/generate", {"adapter": "mix:a*0.70+b*3e-1"}, "mix:a*0.7+b*0.3"),
        ("/v1/completions", {"model": "mix:a*1"}, "mix:a*1.0"),
        # Not a generation, or nothing to route by: any replica answers (and refuses what is malformed).
        ("/v1/adapters", {"adapter": "a"}, None),
        ("/v1/generate", b"{not json", None),
        ("/v1/generate", [1, 2], None),
        ("/v1/generate", {"adapter": 3}, None),
        ("/v1/generate", {"adapter": ""}, None),
        ("/v1/generate", {"adapter": "mix:a*x"}, None),
        ("/v1/generate", {"adapter": "mix:a*1+a*2"}, None),
        ("/v1/generate", {"adapter": {"mix": [{"name": "a", "weight": True}]}}, None),
        ("/v1/generate", {"adapter": {"mix": "a"}}, None),
    ],
)  # fmt: skip
def test_routing_id(path: str, body: object, expected: str | None) -> None:
    assert _rid(path, body) == expected


def test_only_posts_are_routed_and_adapter_names_of_an_id() -> None:
    assert _rid("/v1/generate", {"adapter": "a"}, method="GET") is None
    assert adapter_names(None, BASE) == [] and adapter_names(BASE, BASE) == []
    assert adapter_names("legal", BASE) == ["legal"]
    assert adapter_names("mix:a*0.7+b*0.3", BASE) == ["a", "b"]


def _app(disconnected: asyncio.Event) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, object]:
        return {"body": (await request.body()).decode(), "key": request.headers.get("authorization"),
                "query": request.url.query}  # fmt: skip

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def chunks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.001)
            finally:
                disconnected.set()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/burst")
    async def burst() -> StreamingResponse:
        async def chunks():
            for i in range(50):  # no await between chunks: they queue up faster than a slow caller takes them
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


def _collect(app: FastAPI, request: ForwardedRequest, limit: int | None = None) -> list[ResponseStart | bytes]:
    async def run() -> list[ResponseStart | bytes]:
        out: list[ResponseStart | bytes] = []
        gen = call_asgi(app, request, (("x-lora-replica", "r1"),))
        async for item in gen:
            out.append(item)
            if limit is not None and len(out) >= limit:
                await gen.aclose()
                break
        return out

    return asyncio.run(run())


def test_a_forwarded_request_is_answered_by_the_app_with_the_replica_header() -> None:
    app = _app(asyncio.Event())
    request = ForwardedRequest("POST", "/echo", b"a=1", (("Authorization", "Bearer k"),), b"hello", ("10.0.0.1", 5))
    start, *body = _collect(app, request)
    assert isinstance(start, ResponseStart) and start.status == 200
    assert start.header("x-lora-replica") == "r1" and start.header("content-type") == "application/json"
    assert json.loads(b"".join(b for b in body if isinstance(b, bytes))) == {"body": "hello", "key": "Bearer k",
                                                                              "query": "a=1"}  # fmt: skip


def test_a_stream_arrives_chunk_by_chunk_and_closing_it_disconnects_the_app() -> None:
    async def run() -> tuple[int, bool]:
        disconnected = asyncio.Event()
        gen = call_asgi(_app(disconnected), ForwardedRequest("GET", "/stream"))
        items = []
        async for item in gen:
            items.append(item)
            if len(items) == 6:
                break
        await gen.aclose()
        await asyncio.wait_for(disconnected.wait(), 5)  # the app's generator was stopped, not run to the end
        return len(items), disconnected.is_set()

    count, disconnected = asyncio.run(run())
    assert count == 6 and disconnected


def test_chunks_waiting_for_a_slow_caller_are_sent_as_one_without_losing_bytes() -> None:
    async def run() -> list[ResponseStart | bytes]:
        items = []
        async for item in call_asgi(_app(asyncio.Event()), ForwardedRequest("GET", "/burst")):
            items.append(item)
            await asyncio.sleep(0.01)  # the caller (a Ray transfer) is slower than the app
        return items

    start, *body = asyncio.run(run())
    assert isinstance(start, ResponseStart) and start.status == 200
    assert b"".join(b for b in body if isinstance(b, bytes)) == "".join(f"data: {i}\n\n" for i in range(50)).encode()
    assert len(body) < 25, "waiting chunks are coalesced"


def test_an_app_error_is_a_500_with_a_json_body() -> None:
    start, *body = _collect(_app(asyncio.Event()), ForwardedRequest("GET", "/boom"))
    assert isinstance(start, ResponseStart) and start.status == 500
    assert b"".join(b for b in body if isinstance(b, bytes))


def _exposition(requests: float, latency: float) -> str:
    registry = CollectorRegistry()
    Counter("lora_requests", "Requests", ["adapter"], registry=registry).labels("a").inc(requests)
    Histogram("lora_ttft_seconds", "TTFT", registry=registry).observe(latency)
    return generate_latest(registry).decode()


def test_replica_metrics_are_merged_by_family_with_a_replica_label() -> None:
    texts = {"r1": _exposition(3, 0.2), "r2": _exposition(5, 2.0), "bad": "lora_x{ 1"}
    families = {f.name: f for f in merge_expositions(texts)}
    assert {"lora_requests", "lora_ttft_seconds"} <= set(families)  # (and the client's *_created series)
    totals = {s.labels["replica"]: s.value for s in families["lora_requests"].samples if s.name.endswith("_total")}
    assert totals == {"r1": 3.0, "r2": 5.0}
    text = generate_latest(registry_for(lambda: (texts, 2, 3))).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}  # one family per name, parseable
    assert {s.labels["state"]: s.value for s in parsed["lora_ray_replicas"].samples} == {"up": 2.0, "target": 3.0}
    counts = [s for s in parsed["lora_ttft_seconds"].samples if s.name == "lora_ttft_seconds_count"]
    assert sorted(s.labels["replica"] for s in counts) == ["r1", "r2"]


def test_ray_settings_are_checked_before_ray_starts() -> None:
    s = settings_from_args({"replicas": 3, "api_key": "k", "replica_gpus": 1, "device": "cuda"})
    single = s.replica_settings()
    assert not hasattr(single, "replicas") and single.api_key is not None
    assert single.cpu_threads == 1, "a replica computes with the CPUs Ray reserved for it (replica_cpus: 1)"
    assert settings_from_args({"replica_cpus": 3.5}).replica_settings().cpu_threads == 3
    assert settings_from_args({"replica_cpus": 4, "cpu_threads": 2}).replica_settings().cpu_threads == 2
    assert single.api_key.get_secret_value() == "k" and single.device == "cuda"
    with pytest.raises(ValueError, match="unknown setting.*replica_count"):
        settings_from_args({"replica_count": 2})
    with pytest.raises(ValidationError, match="set together"):
        RaySettings(min_replicas=1)
    with pytest.raises(ValidationError, match="between min_replicas and max_replicas"):
        RaySettings(replicas=5, min_replicas=1, max_replicas=4)
    with pytest.raises(ValidationError, match="replica_gpus"):
        RaySettings(device="cuda")
    assert RaySettings(max_batch_size=16, max_queue=100).max_ongoing == 116
    assert RaySettings(replica_max_ongoing=3).max_ongoing == 3


def test_the_key_table_rebuilt_from_rules_answers_every_route_like_the_servers() -> None:
    from server.api.app import access_rules, documentation_paths, include_routes
    from server.api.key_guard import AccessTable

    app = FastAPI()
    include_routes(app)
    table = AccessTable.from_routes(app.routes, open_paths=documentation_paths(app))
    rebuilt = AccessTable.from_rules(access_rules())
    assert len(rebuilt.entries) == len(table.entries) > 10
    paths = {e.path.replace("{name}", "legal-v2").replace("{adapter}", "legal-v2") for e in table.entries}
    for path in [*paths, "/v1/adapters/a/b", "/nowhere", "/v1/models/x"]:
        for method in ("GET", "POST", "DELETE", "HEAD", "PUT"):
            scope = {"type": "http", "method": method, "path": path, "root_path": ""}
            assert rebuilt.lookup(scope) == table.lookup(scope), (method, path)


def test_the_ingress_and_routing_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, server.deploy.ingress, server.deploy.routing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "the ingress must not load torch (hundreds of MB per ingress replica)"


def _report(replica_id: str) -> ReplicaReport:
    return ReplicaReport(replica_id, pid=1, node="n", ready=True, running=0, queued=0, resident=[], host_copies=[],
                         multiplexed=[])  # fmt: skip


def test_directory_asks_for_metrics_only_while_a_scrape_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(directory_module.time, "time", lambda: clock[0])
    directory = ReplicaDirectory()
    assert directory.report(_report("r1")) is False  # nobody scraped: no metrics rendered
    assert directory.report(_report("r2")) is False
    clock[0] += 1
    since = directory.want_metrics()
    assert directory.metrics(since) == (directory.snapshot(), {}, False)
    clock[0] += 1
    assert directory.report(_report("r1")) is True  # r1 learns of the scrape from its report's answer
    directory.put_metrics("r1", "m1")
    assert directory.report(_report("r1")) is False  # sent: not asked again
    _, texts, fresh = directory.metrics(since)
    assert (texts, fresh) == ({"r1": "m1"}, False)  # r2 has not answered yet
    assert directory.report(_report("r2")) is True
    directory.put_metrics("r2", "m2")
    assert directory.metrics(since)[1:] == ({"r1": "m1", "r2": "m2"}, True)
    clock[0] += 1
    later = directory.want_metrics()
    assert directory.metrics(later)[1:] == ({"r1": "m1", "r2": "m2"}, False)  # the last ones, until fresh
    directory.leave("r2")
    clock[0] += STALE_AFTER_S + 1  # r1 stopped reporting: not live, its metrics gone
    assert directory.metrics(later) == ([], {}, True)
