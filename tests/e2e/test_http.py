"""The HTTP service through a real uvicorn process on 127.0.0.1: uploads, generation vs PEFT, streaming, the openai
client, restarts, every error status, metrics."""

import io
import json
import socket
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from loadtests.common.peft_reference import PeftReference
from loadtests.common.server_process import ServerProcess
from tests.helpers.http_client import sse_events, upload

PROMPT = "the customer asked about a refund"


def raw_status(server: ServerProcess, request_line: str, headers: dict[str, str]) -> int:
    """Send only a request head (a client may declare a body it never sends) and read the status code."""
    head = f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((head + "\r\n").encode())
        return int(sock.recv(200).split(b" ")[1])


@pytest.fixture(scope="module")
def peft_expected(tiny_model_dir, tiny_adapters):
    """PEFT's greedy continuation text of PROMPT for adapter 0 (ignoring EOS) and the tokenizer used."""
    reference = PeftReference(tiny_model_dir("llama"), tiny_adapters("llama")[:1])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    reference.model.set_adapter(reference.names[0])
    with torch.inference_mode():
        out = reference.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       do_sample=False, eos_token_id=None, pad_token_id=2)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_health_ready(server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_upload_generate_matches_peft_stream_and_openai(server, tiny_adapters, peft_expected) -> None:
    r = upload(server.url, "support-fr", tiny_adapters("llama")[0])
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["name"] == "support-fr" and record["rank"] == 4 and record["state"] == "disk"
    assert len(record["sha256"]) == 64 and record["size_bytes"] > 0

    body = {"adapter": "support-fr", "prompt": PROMPT, "max_new_tokens": 12, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["text"] == peft_expected and answer["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 12 and answer["adapter"] == "support-fr"

    with httpx.stream("POST", f"{server.url}/v1/generate", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    tokens = [e for e in events[:-1] if isinstance(e, dict) and "token" in e]
    assert len(tokens) == 12
    assert "".join(e["token"]["text"] for e in tokens) == answer["text"]
    assert events[-2]["finish_reason"] == "length" and events[-2]["usage"]["completion_tokens"] == 12

    assert httpx.get(f"{server.url}/v1/adapters/support-fr").json()["state"] == "gpu"
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert any(m["id"] == "support-fr" and m["parent"] == models[0]["id"] for m in models)

    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.completions.create(model="support-fr", prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.choices[0].text.startswith(peft_expected[:20])
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="support-fr", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
        )  # fmt: skip
    )
    assert streamed == completion.choices[0].text
    chat = client.chat.completions.create(
        model="support-fr", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    chunks = client.chat.completions.create(
        model="support-fr", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    with_usage = list(client.chat.completions.create(
        model="support-fr", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == chat.usage.completion_tokens
    long = list(client.completions.create(model="support-fr", prompt=PROMPT, max_tokens=30, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True}))  # fmt: skip
    assert long[-1].usage.completion_tokens == 30  # ignore_eos (vLLM's extension) keeps it going past EOS
    base = client.completions.create(model=models[0]["id"], prompt=PROMPT, max_tokens=12, temperature=0)
    assert base.choices[0].text != completion.choices[0].text  # the adapter changes the answer

    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200 and not metrics.history  # served at /metrics itself, no redirect
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    done = [s for s in families["lora_requests"].samples if s.labels.get("adapter") == "support-fr"]
    assert sum(s.value for s in done if s.name == "lora_requests_total") >= 4
    assert families["lora_adapters_registered"].samples[0].value >= 1
    blocks = {s.labels["state"]: s.value for s in families["lora_kv_blocks"].samples}
    assert blocks["used"] == 0 and blocks["cached"] > 0  # finished requests' full blocks stay cached for reuse
    assert families["lora_kv_block_bytes"].samples[0].value > 0
    # The same prompt on the same adapter, several times above: its full blocks were served from the cache.
    assert families["lora_prefix_cache_hit_tokens"].samples[0].value > 0
    assert families["lora_preemptions"].samples[0].value == 0
    pool = {s.labels["state"]: s.value for s in families["lora_adapter_pool_bytes"].samples}
    assert 0 < pool["used"] <= pool["total"]


def test_archive_upload_and_delete(server, tiny_adapters) -> None:
    folder = tiny_adapters("llama")[2]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(folder / f, f"legal-v2/{f}")
    files = {"archive": ("legal-v2.zip", buffer.getvalue(), "application/zip")}
    r = httpx.post(f"{server.url}/v1/adapters", data={"name": "legal-v2"}, files=files, timeout=60)
    assert r.status_code == 201, r.text
    assert "legal-v2" in [a["name"] for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]]
    body = {"adapter": "legal-v2", "prompt": PROMPT, "max_new_tokens": 3}
    assert httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).status_code == 200
    assert httpx.delete(f"{server.url}/v1/adapters/legal-v2").status_code == 204
    assert httpx.get(f"{server.url}/v1/adapters/legal-v2").status_code == 404
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_corrupt_adapter_on_disk_fails_only_its_requests(server, tiny_adapters) -> None:
    assert upload(server.url, "corrupt-later", tiny_adapters("llama")[4]).status_code == 201
    stored = server.data_dir / "adapters" / "corrupt-later" / "adapter_model.safetensors"
    stored.write_bytes(b"corrupted after the upload was accepted")
    r = httpx.post(f"{server.url}/v1/generate", json={"adapter": "corrupt-later", "prompt": PROMPT}, timeout=60)
    assert r.status_code == 503 and r.headers.get("retry-after")
    assert "failed to load" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}, timeout=60)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"adapter": "nope", "prompt": "hi"}, 404),
        ({"prompt": "hi", "max_new_tokens": 0}, 422),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422),
        ({"prompt": "hi", "temperature": -1}, 422),
        ({"prompt": ""}, 422),
        ({"prompt": "hi", "unknown_field": 1}, 400),
        ({"prompt": "hi " * 300, "max_new_tokens": 10}, 400),
        ({"prompt": "hi", "max_new_tokens": 1000}, 400),
    ],
)
def test_generate_errors(server, body, status) -> None:
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] and error["message"]


def test_upload_errors(server, tiny_adapters, tmp_path) -> None:
    folder = tiny_adapters("llama")[1]
    assert upload(server.url, "dup", folder).status_code == 201
    r = upload(server.url, "dup", folder)
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict"
    assert upload(server.url, "../evil", folder).status_code == 400
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_dora": True,
                                                         "target_modules": ["q_proj"]}))  # fmt: skip
    (bad / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    r = upload(server.url, "dora", bad)
    assert r.status_code == 422 and "use_dora" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/adapters", data={"name": "x"}, timeout=10)
    assert r.status_code in (400, 422)
    assert raw_status(server, "POST /v1/adapters", {"Content-Length": str(10**12)}) == 413  # refused before reading
    assert "dora" not in [a["name"] for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]]


def test_restart_keeps_adapters_and_queue_limit(tiny_model_dir, tiny_adapters, tmp_path) -> None:
    store = tmp_path / "store"
    flags = ("--gpu-slots", "1", "--max-batch-size", "1", "--max-queue", "1", "--max-seq-len", "512",
             "--startup-adapters", str(tmp_path / "none"))  # fmt: skip
    with ServerProcess(tiny_model_dir("llama"), store, *flags) as first:
        assert upload(first.url, "keep-me", tiny_adapters("llama")[3]).status_code == 201
        before = httpx.post(f"{first.url}/v1/generate", json={"adapter": "keep-me", "prompt": PROMPT}, timeout=60)
    with ServerProcess(tiny_model_dir("llama"), store, *flags) as second:
        names = [a["name"] for a in httpx.get(f"{second.url}/v1/adapters").json()["adapters"]]
        assert names == ["keep-me"]
        after = httpx.post(f"{second.url}/v1/generate", json={"adapter": "keep-me", "prompt": PROMPT}, timeout=60)
        assert after.json()["text"] == before.json()["text"]

        def slow(_: int) -> httpx.Response:
            body = {"prompt": PROMPT, "max_new_tokens": 200, "ignore_eos": True}
            return httpx.post(f"{second.url}/v1/generate", json=body, timeout=120)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(slow, range(8)))
        statuses = sorted(r.status_code for r in answers)
        assert 200 in statuses and 429 in statuses
        assert all(r.headers.get("retry-after") for r in answers if r.status_code == 429)


@pytest.mark.parametrize(
    ("path", "extra", "named"),
    [
        ("/v1/completions", {"best_of": 3}, "best_of"),  # more than n: sequences made and thrown away
        ("/v1/completions", {"suffix": "x"}, "suffix"),
        ("/v1/completions", {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
         "continuous_usage_stats"),
        ("/v1/completions", {"structured_outputs": {"grammar": "root ::= 'a'"}}, "grammar"),
        ("/v1/completions", {"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
        ("/v1/completions", {"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),
        ("/v1/chat/completions", {"tools": []}, "tools"),
        ("/v1/chat/completions", {"functions": []}, "functions"),
        ("/v1/chat/completions", {"best_of": 2}, "best_of"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "name"),
        ("/v1/generate", {"n": 2}, "n"),
    ],
)  # fmt: skip
def test_fields_the_server_does_not_implement_are_refused_by_name(server, path: str, extra: dict, named: str) -> None:
    """Never accept and ignore: a field we do not serve answers 400 naming it, instead of an answer that looks right."""
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    bodies = {
        "/v1/completions": {"model": model, "prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/v1/generate": {"prompt": "hi", "max_new_tokens": 2},
    }
    r = httpx.post(f"{server.url}{path}", json={**bodies[path], **extra}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "unsupported_field" and named in error["message"], error


def test_neutral_values_of_unimplemented_openai_fields_are_served(server) -> None:
    """Clients that send a field's neutral value ask for nothing we skip: served as without it."""
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "team-a"}
    completion = {"model": model, "prompt": "hi", "max_tokens": 3, "temperature": 0, "logprobs": None, "best_of": 1}
    plain = httpx.post(f"{server.url}/v1/completions", json=completion, timeout=60)
    r = httpx.post(f"{server.url}/v1/completions", json={**completion, **neutral}, timeout=60)
    assert r.status_code == plain.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": False,
            "top_logprobs": 0, **neutral}  # fmt: skip
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
