"""Issue 6 behaviour through a real server process: body limits (declared and chunked), per-request limits,
request timeouts, a non-streaming client that disconnects, keys on /health and /metrics, SIGTERM drain."""

import json
import signal
import socket
import time

import httpx
import pytest

from loadtests.common.server_process import ServerProcess
from tests.helpers.http_client import metric, sse_events, upload, wait_for

PROMPT = "the customer asked about a refund"
LONG = {"prompt": PROMPT, "max_new_tokens": 480, "ignore_eos": True}  # seconds of decoding on the tiny model


def chunked_post(port: int, path: str, chunks: int, chunk_bytes: int, content_type: str, prefix: bytes = b"") -> int:
    """POST a body with Transfer-Encoding: chunked (no Content-Length) and return the status, even if the server
    answers before the whole body is sent."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        if prefix:
            sock.sendall(f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n")
        piece = f"{chunk_bytes:x}\r\n".encode() + b"a" * chunk_bytes + b"\r\n"
        try:
            for _ in range(chunks):
                sock.sendall(piece)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early: that is the point
        data = b""
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return int(data.split(b" ")[1])


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("reliability")
    flags = ("--gpu-slots", "2", "--max-seq-len", "512", "--max-batch-size", "4", "--request-timeout", "30",
             "--max-prompt-tokens", "64", "--max-new-tokens", "480", "--max-request-bytes", "65536",
             "--max-upload-bytes", "600000", "--startup-adapters", str(data / "none"))  # fmt: skip
    with ServerProcess(tiny_model_dir("llama"), data / "store", *flags) as proc:
        yield proc


def test_oversize_bodies_get_413_declared_or_chunked(server, tiny_adapters) -> None:
    url = server.url
    big_prompt = {"prompt": "x" * 70_000}
    r = httpx.post(f"{url}/v1/generate", json=big_prompt, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_large"
    # No Content-Length: counted while it streams in, refused at the limit (the upload limit is 2x + 1 MiB).
    assert chunked_post(server.port, "/v1/generate", 40, 4096, "application/json") == 413
    part = b'--xyz\r\nContent-Disposition: form-data; name="adapter_model"; filename="m.safetensors"\r\n\r\n'
    assert chunked_post(server.port, "/v1/adapters", 400, 8192, "multipart/form-data; boundary=xyz", part) == 413
    # Small chunked bodies are read as usual.
    assert chunked_post(server.port, "/v1/generate", 1, 10, "application/json") in (400, 422)
    assert httpx.get(f"{url}/v1/adapters", timeout=10).json()["adapters"] == []
    assert upload(url, "fits", tiny_adapters("llama")[0]).status_code == 201


def test_per_request_limits(server) -> None:
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 481}, timeout=30)
    assert r.status_code == 400 and "limit is 480" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "word " * 100, "max_new_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "limit is 64" in r.json()["error"]["message"]


def test_request_timeout_answers_504_or_ends_the_stream(tiny_model_dir, tmp_path) -> None:
    # One row and a 0.3 s limit: 480 tokens take longer than that on any machine (at least 480 model steps).
    flags = ("--max-seq-len", "512", "--max-batch-size", "1", "--request-timeout", "0.3",
             "--startup-adapters", str(tmp_path / "none"))  # fmt: skip
    with ServerProcess(tiny_model_dir("llama"), tmp_path / "store", *flags) as server, httpx.Client(timeout=60) as c:
        r = c.post(f"{server.url}/v1/generate", json=LONG)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        with c.stream("POST", f"{server.url}/v1/generate", json={**LONG, "stream": True}) as s:
            assert s.status_code == 200
            events = sse_events(s)
        final = [e for e in events if isinstance(e, dict) and e.get("finish_reason")][-1]
        assert final["finish_reason"] == "timeout" and final["error"] and events[-1] == "[DONE]"
        with c.stream("POST", f"{server.url}/v1/completions", json={"model": "x", "prompt": PROMPT}) as s:
            assert s.status_code == 404  # unknown model: answered before any stream starts
        body = {
            "model": server_model_id(c, server.url),
            "prompt": PROMPT,
            "max_tokens": 480,
            "stream": True,
            "ignore_eos": True,
        }
        with c.stream("POST", f"{server.url}/v1/completions", json=body) as s:
            assert s.status_code == 200, s.read()
            events = sse_events(s)
        assert any(isinstance(e, dict) and e.get("error", {}).get("type") == "timeout" for e in events), events[-3:]
        assert metric(server.url, "lora_requests_total", outcome="timeout") >= 3
        assert metric(server.url, "lora_running_requests") == 0


def server_model_id(client: httpx.Client, url: str) -> str:
    return str(client.get(f"{url}/v1/models").json()["data"][0]["id"])


def test_non_streaming_client_that_disconnects_is_cancelled(server) -> None:
    before = metric(server.url, "lora_requests_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/generate", json=LONG, timeout=0.5)
    # Cancelled within a step or two of the disconnect (the request would otherwise run for seconds).
    assert wait_for(lambda: metric(server.url, "lora_requests_total", outcome="cancelled") > before, 2.0) < 2.0
    assert metric(server.url, "lora_running_requests") == 0


def test_keys_guard_health_and_metrics_when_configured_and_sigterm_drains(tiny_model_dir, tmp_path) -> None:
    flags = ("--api-key", "inference-key", "--admin-key", "admin-key", "--health-requires-key",
             "--metrics-requires-key", "--max-seq-len", "512", "--drain-timeout", "20",
             "--startup-adapters", str(tmp_path / "none"))  # fmt: skip
    proc = ServerProcess(tiny_model_dir("llama"), tmp_path / "store", *flags)
    proc.start(ready_headers={"Authorization": "Bearer inference-key"})
    try:
        url, key = proc.url, {"Authorization": "Bearer inference-key"}
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{url}{path}", timeout=10).status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
            assert httpx.get(f"{url}{path}", headers=key, timeout=10).status_code == 200
        assert "inference-key" not in proc.log.read_text() and "admin-key" not in proc.log.read_text()

        # SIGTERM while a stream runs: the stream finishes in full, new connections are refused, then the process exits.
        body = {**LONG, "max_new_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/generate", json=body, headers=key, timeout=60) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        events = [json.loads(first[6:])] + [json.loads(e) for e in rest if e != "[DONE]"]
        assert rest[-1] == "[DONE]"
        assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 200
        # uvicorn re-raises the SIGTERM it caught once it has drained, so the exit status is the signal's.
        assert proc.proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", headers=key, timeout=5)
    finally:
        proc.stop()


def test_sigterm_drain_is_bounded(tiny_model_dir, tmp_path) -> None:
    flags = ("--max-seq-len", "512", "--drain-timeout", "1", "--max-batch-size", "1",
             "--startup-adapters", str(tmp_path / "none"))  # fmt: skip
    with ServerProcess(tiny_model_dir("llama"), tmp_path / "store", *flags) as proc:
        assert proc.proc is not None
        with httpx.stream("POST", f"{proc.url}/v1/generate", json={**LONG, "stream": True}, timeout=60) as s:
            next(line for line in s.iter_lines() if line.startswith("data: "))
            start = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(30)
        assert time.monotonic() - start < 10


def test_deleting_an_adapter_in_use_is_safe(server, tiny_adapters) -> None:
    url = server.url
    assert upload(url, "busy", tiny_adapters("llama")[2]).status_code == 201
    body = {"adapter": "busy", "prompt": PROMPT, "max_new_tokens": 200, "ignore_eos": True}
    undisturbed = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()["text"]
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}, timeout=60) as s:
        lines = s.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert httpx.delete(f"{url}/v1/adapters/busy", timeout=10).status_code == 204
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=10).status_code == 404
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    events = [json.loads(first[6:]), *rest]
    assert events[-1]["finish_reason"] == "length"
    assert "".join(e["token"]["text"] for e in events if "token" in e) == undisturbed  # same weights to the end
    # The slot was cleared once the stream released it: a new adapter with that name starts from its own weights.
    assert upload(url, "busy", tiny_adapters("llama")[1]).status_code == 201
    fresh = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()["text"]
    assert fresh != undisturbed
