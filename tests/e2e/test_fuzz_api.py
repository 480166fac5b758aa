"""Schema-driven fuzzing (schemathesis) of every operation in ``/openapi.json`` against a real server process on the
tiny random Llama with two adapters registered, with schema-valid and schema-invalid requests: no 5xx, documented
status codes and content types, JSON bodies that match their schemas, well-formed SSE streams; afterwards the server
is healthy, logged no traceback, and both adapters still give PEFT's greedy tokens.

Every schema-invalid request must also be refused (the request models validate in pydantic's strict mode, so
``{"temperature": true}`` is no longer taken as 1.0); ``FUZZ_STRICT_INPUT=0`` turns that check off.

Bounded cost: ``--max-new-tokens 8`` on the server caps every generation, and the hooks fold generated token counts
(``max_new_tokens``, ``max_tokens``, ``max_completion_tokens``; inserted when absent) into 1..8 so most requests
reach the engine instead of a 400. The hooks also steer names: generation targets the base model or a registered
adapter most of the time, uploads often carry a valid PEFT save or archive, and GET/DELETE by name aim at names the
fuzzer uploads (DELETE never at the two adapters checked at the end). A hook keeps a field's validity class (a value
the schema forbids stays forbidden), so schema-invalid cases stay invalid. ``FUZZ_EXAMPLES`` (default 25) sets
the examples per operation; runs are derandomized (the same cases every run) unless ``FUZZ_RANDOM=1``. A deeper
hunt: ``FUZZ_EXAMPLES=300 FUZZ_RANDOM=1 pytest tests/e2e/test_fuzz_api.py`` (a few minutes).

Each operation is its own parametrized test calling ``APIOperation.as_strategy`` under ``@given``: schemathesis'
own pytest integration for a schema loaded in a fixture (``schemathesis.pytest.from_fixture``) does not work with
pytest 9.2 (it sets ``Function._nodeid``, which pytest no longer has).
"""

import io
import json
import os
import zipfile
from collections import Counter

import httpx
import jsonschema_rs
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from transformers import AutoTokenizer

from loadtests.common.peft_reference import PeftReference
from loadtests.common.server_process import ServerProcess
from tests.helpers.http_client import sse_events, upload

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
DERANDOMIZE = os.environ.get("FUZZ_RANDOM") != "1"
STRICT_INPUT = os.environ.get("FUZZ_STRICT_INPUT", "1") == "1"
MAX_NEW = 8  # the server's --max-new-tokens: no fuzzed request generates more
CORE_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream"}
KEPT = ("kept-a", "kept-b")  # registered before the fuzz, never deleted by it, checked against PEFT at the end
FUZZED = ("fuzz-0", "fuzz-1")  # the names valid fuzzed uploads use and GET/DELETE aim at
PROMPT = "the customer asked about a refund"
OPENAI_GENERATION = ("/v1/completions", "/v1/chat/completions")
FILE_PARTS = ("adapter_config", "adapter_model", "archive")

# Listed rather than read from the schema so that each operation is its own test id (the schema comes from a
# fixture); test_schema_has_exactly_the_fuzzed_operations fails when an operation is missing here.
OPERATIONS = (
    "POST /v1/generate", "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
    "POST /v1/adapters", "GET /v1/adapters", "GET /v1/adapters/{name}", "DELETE /v1/adapters/{name}",
    "GET /health", "GET /ready", "GET /metrics",
    "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter", "POST /tokenize", "POST /detokenize",
)  # fmt: skip
# Answers the steering must have produced, or the fuzz never got past validation to the engine and the registry.
MUST_REACH = {
    ("POST /v1/generate", 200), ("POST /v1/completions", 200), ("POST /v1/chat/completions", 200),
    ("POST /v1/adapters", 201), ("DELETE /v1/adapters/{name}", 204), ("GET /v1/adapters/{name}", 200),
}  # fmt: skip
answered: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home(tmp_path_factory):
    """Hypothesis caches constants read from our sources in its home directory (``./.hypothesis`` by default):
    keep that out of the checkout."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapters, tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    (data / "loadable").mkdir()  # vLLM's load endpoint is on, so fuzzed paths reach the path checks
    flags = ("--gpu-slots", "2", "--max-batch-size", "4", "--max-seq-len", "128", "--max-new-tokens", str(MAX_NEW),
             "--max-upload-bytes", "2000000", "--startup-adapters", str(data / "none"),
             "--lora-load-dir", str(data / "loadable"))  # fmt: skip
    with ServerProcess(tiny_model_dir("llama"), data / "store", *flags) as proc:
        for name, folder in zip(KEPT, tiny_adapters("llama")[:2], strict=True):
            assert upload(proc.url, name, folder).status_code == 201
        yield proc


def _archive(folder) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(folder / f, f"save/{f}")
    return buffer.getvalue()


def _fold(value: object) -> object:
    """A schema-valid token count (an integer in 1..1e6, possibly written 12.0) becomes 1..MAX_NEW; anything else
    (a wrong type, out of range) is left as it is."""
    integral = type(value) is int or (type(value) is float and value.is_integer())
    if integral and 1 <= value <= 1_000_000:  # type: ignore[operator]
        return 1 + int(value) % MAX_NEW  # type: ignore[call-overload]
    return value


def _named(value: object, names: list, nullable: bool = False) -> st.SearchStrategy:
    """A valid name field (a string, or null where allowed) often becomes one of ``names``; a value of another type
    stays (it is what a negative case is about)."""
    if (isinstance(value, str) and len(value) <= 64) or (nullable and value is None):
        return st.sampled_from([*names, value])
    return st.just(value)


def _files_as_file_parts(raw: dict) -> dict:
    """FastAPI describes an optional upload as ``anyOf: [binary string, null]``, which schemathesis sends as a plain
    form field (FastAPI then answers 422 before our code runs). On the wire an absent part is the only "null", so
    declare the bare binary string: the fuzzer then sends real file parts."""
    for definition in raw["components"]["schemas"].values():
        for name, prop in definition.get("properties", {}).items():
            binary = [s for s in prop.get("anyOf", ()) if s.get("contentMediaType") == "application/octet-stream"]
            if binary:
                definition["properties"][name] = {**binary[0], "description": prop.get("description", "")}
    return raw


@pytest.fixture(scope="module")
def api_schema(server, tiny_adapters):
    raw = httpx.get(f"{server.url}/openapi.json").json()
    models = ("CompletionRequest", "ChatCompletionRequest")
    valid_body = {path: jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{model}",
                                                     "components": raw["components"]})
                  for path, model in zip(OPENAI_GENERATION, models, strict=True)}  # fmt: skip
    loaded = schemathesis.openapi.from_dict(_files_as_file_parts(raw))
    loaded.config.update(base_url=server.url)
    base_id = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    folder = tiny_adapters("llama")[4]
    files = {"adapter_config": (folder / "adapter_config.json").read_bytes(),
             "adapter_model": (folder / "adapter_model.safetensors").read_bytes()}  # fmt: skip
    archive = {"archive": _archive(folder)}

    @loaded.hook
    def flatmap_body(ctx, body):
        if not isinstance(body, dict):
            return st.just(body)
        body, path = dict(body), ctx.operation.path
        if path == "/v1/generate":
            body["max_new_tokens"] = _fold(body.get("max_new_tokens", MAX_NEW))
            if "adapter" not in body:
                return st.just(body)
            names = [None, *KEPT, FUZZED[0]]
            return _named(body["adapter"], names, nullable=True).map(lambda a: {**body, "adapter": a})
        if path in OPENAI_GENERATION:
            body["max_tokens"] = _fold(body.get("max_tokens", MAX_NEW))  # the completions default, 16, is over 8
            if "max_completion_tokens" in body:
                body["max_completion_tokens"] = _fold(body["max_completion_tokens"])
            # The bodies have many fields that each can refuse a schema-valid value (a logit_bias id outside the
            # vocabulary, top_logprobs without logprobs, two structured-output fields): half of the examples keep
            # only the core fields, so the fuzz still reaches the engine whatever examples it draws.
            # Only a schema-valid body is cut down: a negative example must stay invalid.
            reduced = {k: v for k, v in body.items() if k in CORE_FIELDS}
            bodies = st.sampled_from([body, reduced]) if valid_body[path].is_valid(body) else st.just(body)
            if "model" not in body:
                return bodies
            models = _named(body["model"], [base_id, base_id, *KEPT, FUZZED[0]])
            return st.tuples(bodies, models).map(lambda pair: {**pair[0], "model": pair[1]})
        parts_valid = all(isinstance(body.get(k, b""), str | bytes) for k in FILE_PARTS)
        if path == "/v1/adapters" and isinstance(body.get("name"), str) and parts_valid:
            rest = {k: v for k, v in body.items() if k not in FILE_PARTS}
            valid = st.tuples(_named(body["name"], list(FUZZED)), st.sampled_from([files, archive]))
            return st.just(body) | valid.map(lambda pair: {**rest, "name": pair[0], **pair[1]})
        return st.just(body)

    @loaded.hook
    def flatmap_path_parameters(ctx, parameters):
        if not parameters or "name" not in parameters:
            return st.just(parameters)
        names = list(FUZZED) if ctx.operation.method.upper() == "DELETE" else [*FUZZED, *KEPT]
        return _named(parameters["name"], names).map(lambda n: {**parameters, "name": n})

    return loaded


def _cases(api_schema, label: str) -> st.SearchStrategy:
    """Schema-valid requests, plus schema-invalid ones where the operation has anything to break."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    cases = operation.as_strategy(GenerationMode.POSITIVE, hooks=api_schema.hooks)
    if operation.body or any(True for _ in operation.iter_parameters()):
        cases |= operation.as_strategy(GenerationMode.NEGATIVE, hooks=api_schema.hooks)
    return cases


def _check_stream(text: str, where: str) -> None:
    """A streamed answer is Server-Sent Events ending with ``[DONE]``; every other event is a JSON object without
    an error (nothing here times out or fails)."""
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", where
    for event in events[:-1]:
        payload = json.loads(event)
        assert isinstance(payload, dict) and not payload.get("error"), where


def test_schema_has_exactly_the_fuzzed_operations(api_schema) -> None:
    live = sorted(f"{r.ok().method.upper()} {r.ok().path}" for r in api_schema.get_all_operations())
    assert live == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_operation(api_schema, server, label) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=_cases(api_schema, label))
    def fuzz(case) -> None:
        response = case.call(timeout=60)
        answered[label, response.status_code] += 1
        where = f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:300]}"
        assert response.status_code < 500, f"{where}\nserver log:\n{server.log.read_text()[-3000:]}"
        streamed = any(v.startswith("text/event-stream") for v in response.headers.get("content-type", []))
        if streamed:
            _check_stream(response.text, where)
        checks = [not_a_server_error, status_code_conformance, *([negative_data_rejection] if STRICT_INPUT else [])]
        if not (streamed and case.operation.path in OPENAI_GENERATION):  # their SSE answers are not in the schema
            checks += [content_type_conformance, response_schema_conformance]
        case.validate_response(response, checks=checks)

    fuzz()


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-45},  # logits / temperature overflowed to inf: NaN probabilities
        {"temperature": 1.0, "top_k": 10**6},  # above the vocabulary: must act as "keep all", not fail the step
    ],
)
def test_fuzzer_findings_stay_fixed(server, sampling) -> None:
    """Requests the fuzzer found answering 503 (and failing every request in the same engine step)."""
    body = {"prompt": PROMPT, "max_new_tokens": 2, **sampling}
    assert httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).status_code == 200
    huge = {"prompt": PROMPT, "max_new_tokens": 2, "temperature": 1.0, "top_k": 2**63}  # once a 503 for the batch
    assert httpx.post(f"{server.url}/v1/generate", json=huge, timeout=60).status_code == 422


def test_healthy_after_fuzz(server, tiny_model_dir, tiny_adapters) -> None:
    if len({label for label, _ in answered}) == len(OPERATIONS):  # the whole fuzz ran (not a -k selection)
        assert MUST_REACH <= set(answered), sorted(answered.items())
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200
    names = [a["name"] for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]]
    assert set(KEPT) <= set(names)
    assert "Traceback" not in server.log.read_text()

    reference = PeftReference(tiny_model_dir("llama"), tiny_adapters("llama")[:2])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    for index, name in enumerate(KEPT):
        reference.model.set_adapter(reference.names[index])
        with torch.inference_mode():
            out = reference.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                           do_sample=False, eos_token_id=None, pad_token_id=2)  # fmt: skip
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        body = {"adapter": name, "prompt": PROMPT, "max_new_tokens": MAX_NEW, "ignore_eos": True}
        assert httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).json()["text"] == expected
        with httpx.stream("POST", f"{server.url}/v1/generate", json={**body, "stream": True}, timeout=60) as r:
            events = sse_events(r)
        assert "".join(e["token"]["text"] for e in events if isinstance(e, dict) and "token" in e) == expected
