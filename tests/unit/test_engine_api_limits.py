"""Issue 13, items 8 and 12 through the HTTP app (in process, on the tiny Llama): stop strings past the caps answer
422 in both APIs, and a dead engine answers 503 on /ready and on every generation route instead of hanging."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import Settings
from server.engine.handle import RequestResult
from server.engine.request import FinishReason
from server.engine.sampling_params import MAX_STOP_LENGTH, MAX_STOP_STRINGS, SamplingParams
from server.service import Service

LONG = "x" * (MAX_STOP_LENGTH + 1)
TOO_MANY = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
AT_CAPS = [str(i) + "x" * (MAX_STOP_LENGTH - 1) for i in range(MAX_STOP_STRINGS)]


def make_service(model_dir: Path, data_dir: Path) -> Service:
    fields = {"base_model": model_dir, "data_dir": data_dir, "startup_adapters": None, "max_seq_len": 64}
    return Service(Settings.model_validate({**fields, "gpu_slots": 1}))


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory) -> Iterator[TestClient]:
    service = make_service(tiny_model_dir("llama"), tmp_path_factory.mktemp("limits") / "store")
    with TestClient(create_app(service)) as client:
        yield client


def generate(client: TestClient, route: str, stop: object) -> tuple[int, dict]:
    """POST to ``route`` a request for 2 tokens of the base model with ``stop``; the status and the JSON answer."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    if route == "/v1/generate":
        body = {"prompt": "hello there", "max_new_tokens": 2, "stop": stop}
    elif route == "/v1/completions":
        body = {"model": model, "prompt": "hello there", "max_tokens": 2, "stop": stop}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": stop}
    r = client.post(route, json=body)
    return r.status_code, r.json()


ROUTES = ["/v1/generate", "/v1/completions", "/v1/chat/completions"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("stop", "problem"),
    [([LONG], "at most 256 characters"), (TOO_MANY, "at most 4 items"), ([""], "at least 1 character")],
)
def test_stop_strings_past_the_caps_answer_422(client, route, stop, problem) -> None:
    status, answer = generate(client, route, stop)
    assert status == 422, answer
    error = answer["error"]
    assert error["type"] == "invalid_request" and "stop" in error["message"] and problem in error["message"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_single_openai_stop_string_past_the_cap_answers_422(client, route) -> None:
    status, answer = generate(client, route, LONG)
    assert status == 422 and "at most 256 characters" in answer["error"]["message"], answer


@pytest.mark.parametrize("route", ROUTES)
def test_stop_strings_at_the_caps_are_served(client, route) -> None:
    assert generate(client, route, AT_CAPS)[0] == 200


def test_a_dead_engine_answers_503_on_ready_and_generation(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """The engine loop dies (a step fails, and so does failing its requests): the request in flight gets an error
    (503 through the API), /ready answers 503 and every generation route answers 503 at once."""
    service = make_service(tiny_model_dir("llama"), tmp_path / "store")
    with TestClient(create_app(service)) as client:
        assert client.get("/ready").status_code == 200

        def broken(*args, **kwargs):
            raise RuntimeError("scheduler state corrupted")

        monkeypatch.setattr(service.engine.scheduler, "schedule", broken)
        monkeypatch.setattr(service.engine.scheduler, "finish", broken)
        # Killed by a request outside HTTP: one that hangs (as it used to) must not also hang the client's shutdown.
        handle = service.engine.submit([1, 2, 3], None, SamplingParams(max_new_tokens=2))
        results: list[RequestResult] = []
        reader = threading.Thread(target=lambda: results.append(handle.result()), daemon=True)
        reader.start()
        reader.join(30)
        assert results, "the request in flight got no final event within 30 s"
        assert results[0].finish_reason == FinishReason.ERROR and "engine stopped" in (results[0].error or "")
        assert client.get("/ready").status_code == 503
        for route in ROUTES:
            status, answer = generate(client, route, [])
            assert status == 503 and "scheduler state corrupted" in answer["error"]["message"], answer
