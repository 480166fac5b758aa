"""Issue 14 through the official ``openai`` client and raw HTTP against a real server on the tiny model, checked
against transformers + PEFT run directly (``openai_reference``): log-probabilities of prompt and completion for the
base model and an adapter, ``echo`` with ``max_tokens: 0`` (scoring, as evaluation harnesses send it), batched
prompts equal to one-by-one answers, ``n`` with seeds, streaming of all of it, and a client that leaves cancelling
every choice."""

import json
import math
import socket

import httpx
import pytest
from openai import OpenAI

from tests.e2e.openai_reference import ATOL, LmReference
from tests.helpers.http_client import metric, sse_events, upload, wait_for

PROMPT = "the customer asked about a refund"
ADAPTER = "parity-a0"
MODELS = [None, 0]  # the base model, adapter 0 (tiny_adapters("llama")[0], served as ADAPTER)


@pytest.fixture(scope="module")
def ref(tiny_model_dir, tiny_adapters) -> LmReference:
    return LmReference(tiny_model_dir("llama"), tiny_adapters("llama")[:1])


@pytest.fixture(scope="module")
def base_id(server, tiny_adapters) -> str:
    """The base model's id; ADAPTER is registered too."""
    assert upload(server.url, ADAPTER, tiny_adapters("llama")[0]).status_code == 201
    return str(httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"])


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def model_name(base_id: str, adapter: int | None) -> str:
    return base_id if adapter is None else ADAPTER


def assert_top(ref: LmReference, row, top: dict[str, float], chosen: int, k: int) -> None:
    """``top`` (token text -> logprob) holds the k most probable tokens of reference row ``row`` [V] and the chosen
    one: each entry is one of those ids' texts with its log-probability (ids that decode alike share one entry),
    and the most probable one is there."""
    values, ids = row.topk(k)
    candidates = {int(i): float(v) for v, i in zip(values, ids, strict=True)} | {chosen: float(row[chosen])}
    assert len(top) <= k + 1
    for text, value in top.items():
        assert any(ref.token(t) == text and abs(v - value) < ATOL for t, v in candidates.items()), (text, value)
    assert math.isclose(max(top.values()), float(values[0]), abs_tol=ATOL)


@pytest.mark.parametrize("adapter", MODELS)
def test_completion_logprobs_with_echo_match_transformers(server, base_id, client, ref, adapter) -> None:
    prompt_ids = ref.encode(PROMPT)
    generated = ref.greedy(prompt_ids, adapter, 6)
    answer = client.completions.create(model=model_name(base_id, adapter), prompt=PROMPT, max_tokens=6, temperature=0,
                                       logprobs=5, echo=True, extra_body={"ignore_eos": True})  # fmt: skip
    [choice] = answer.choices
    text = PROMPT + ref.decode(generated)
    assert choice.text == text and choice.index == 0 and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(prompt_ids) and answer.usage.completion_tokens == 6
    ids = prompt_ids + generated
    lp = choice.logprobs
    assert lp.tokens == [ref.token(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = ref.logprobs(ids, adapter)  # row i: the distribution of token i + 1
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], float(rows[i - 1, ids[i]]), abs_tol=ATOL), i
        assert_top(ref, rows[i - 1], lp.top_logprobs[i], ids[i], 5)
    expected = ref.offsets(prompt_ids) + ref.offsets(generated, prompt_ids, len(PROMPT))
    assert lp.text_offset == expected

    plain = client.completions.create(model=model_name(base_id, adapter), prompt=PROMPT, max_tokens=6, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True})  # fmt: skip
    got = plain.choices[0].logprobs
    assert plain.choices[0].text == ref.decode(generated) and got.tokens == [ref.token(t) for t in generated]
    assert got.token_logprobs == pytest.approx(lp.token_logprobs[len(prompt_ids) :], abs=ATOL)
    assert got.text_offset == ref.offsets(generated, prompt_ids)
    assert all(list(top) == [token] for top, token in zip(got.top_logprobs, got.tokens, strict=True))


@pytest.mark.parametrize("adapter", MODELS)
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_scoring_as_lm_eval_sends_it(server, base_id, ref, adapter, max_tokens) -> None:
    """lm-eval's loglikelihood payload: token-id prompts in a batch (a special token among them), echo, logprobs 1,
    ``temperature`` the integer 0, a seed; max_tokens 1 as lm-eval sends it, 0 as other harnesses do."""
    prompts = [ref.encode(PROMPT), [1, *ref.encode("hello world")]]
    body = {"model": model_name(base_id, adapter), "prompt": prompts, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for ids, choice in zip(prompts, answer["choices"], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
        rows = ref.logprobs(ids, adapter)
        for i in range(1, len(ids)):
            assert math.isclose(lp["token_logprobs"][i], float(rows[i - 1, ids[i]]), abs_tol=ATOL), i
            top = lp["top_logprobs"][i]
            greedy = int(rows[i - 1].argmax()) == ids[i]
            assert (lp["token_logprobs"][i] == max(top.values())) == greedy  # lm-eval's is_greedy: exact floats
        assert choice["text"].startswith(ref.decode(ids))
        if max_tokens:  # the generated token, EOS included, is the last entry
            assert lp["tokens"][-1] == ref.token(int(rows[-1].argmax()))
        else:
            assert choice["text"] == ref.decode(ids) and choice["finish_reason"] == "length"
    assert answer["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert answer["usage"]["completion_tokens"] == max_tokens * len(prompts)


def test_echo_without_logprobs_and_max_tokens_zero(server, base_id, client, ref) -> None:
    answer = client.completions.create(model=ADAPTER, prompt=[PROMPT, "hello"], max_tokens=0, echo=True)
    assert [c.text for c in answer.choices] == [PROMPT, "hello"]
    assert all(c.logprobs is None and c.finish_reason == "length" for c in answer.choices)
    assert answer.usage.completion_tokens == 0
    assert answer.usage.prompt_tokens == len(ref.encode(PROMPT)) + len(ref.encode("hello"))
    ids = ref.encode("hello world")
    echoed = client.completions.create(model=base_id, prompt=ids, max_tokens=2, echo=True, temperature=0)
    assert echoed.choices[0].text.startswith("hello world")  # a token-id prompt echoes its text
    for bad in ({"max_tokens": 0}, {"max_tokens": 0, "logprobs": 1}):  # scoring needs echo
        r = httpx.post(f"{server.url}/v1/completions", json={"model": base_id, "prompt": "hi", **bad}, timeout=30)
        assert r.status_code == 422, r.text


def test_batched_prompts_equal_one_by_one(server, base_id, client, ref) -> None:
    prompts = [PROMPT, "hello world", "a", "the refund"]
    fields = {"max_tokens": 5, "temperature": 0, "logprobs": 2, "extra_body": {"ignore_eos": True}}
    batch = client.completions.create(model=ADAPTER, prompt=prompts, **fields)
    assert [c.index for c in batch.choices] == list(range(len(prompts)))
    for prompt, choice in zip(prompts, batch.choices, strict=True):
        alone = client.completions.create(model=ADAPTER, prompt=prompt, **fields).choices[0]
        assert choice.text == alone.text == ref.decode(ref.greedy(ref.encode(prompt), 0, 5))
        assert choice.logprobs.tokens == alone.logprobs.tokens
        assert choice.logprobs.token_logprobs == pytest.approx(alone.logprobs.token_logprobs, abs=ATOL)
    as_ids = client.completions.create(model=ADAPTER, prompt=[ref.encode(p) for p in prompts], **fields)
    assert [c.text for c in as_ids.choices] == [c.text for c in batch.choices]
    assert batch.usage.prompt_tokens == sum(len(ref.encode(p)) for p in prompts)
    assert batch.usage.completion_tokens == 5 * len(prompts)


def test_n_with_seeds_is_reproducible_and_each_choice_is_a_seeded_request(server, base_id, client, ref) -> None:
    fields = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0,
              "extra_body": {"ignore_eos": True}}  # fmt: skip
    group = client.completions.create(n=3, seed=42, best_of=3, logprobs=1, **fields)
    assert [c.index for c in group.choices] == [0, 1, 2]
    texts = [c.text for c in group.choices]
    assert len(set(texts)) > 1  # three different seeds
    for i, choice in enumerate(group.choices):
        single = client.completions.create(seed=42 + i, logprobs=1, **fields).choices[0]
        assert single.text == choice.text
        assert single.logprobs.token_logprobs == pytest.approx(choice.logprobs.token_logprobs, abs=ATOL)
    assert [c.text for c in client.completions.create(n=3, seed=42, **fields).choices] == texts
    assert group.usage.prompt_tokens == len(ref.encode(PROMPT))  # the prompt counts once (as vLLM counts)
    assert group.usage.completion_tokens == 24

    two = client.completions.create(n=2, seed=5, **{**fields, "prompt": [PROMPT, "hello"]})  # index = prompt * n + i
    for index, (prompt, i) in enumerate([(PROMPT, 0), (PROMPT, 1), ("hello", 0), ("hello", 1)]):
        single = client.completions.create(seed=5 + i, **{**fields, "prompt": prompt}).choices[0]
        assert two.choices[index].index == index and two.choices[index].text == single.text

    chat = {"model": ADAPTER, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 1.0,
            "extra_body": {"ignore_eos": True}}  # fmt: skip
    group_chat = client.chat.completions.create(n=3, seed=9, **chat)
    for i, choice in enumerate(group_chat.choices):
        assert choice.index == i
        assert choice.message.content == client.chat.completions.create(seed=9 + i, **chat).choices[0].message.content
    assert group_chat.usage.completion_tokens == 24


@pytest.mark.parametrize("adapter", MODELS)
def test_chat_logprobs_match_transformers(server, base_id, client, ref, adapter) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = ref.chat_ids(messages)
    generated = ref.greedy(prompt_ids, adapter, 5)
    fields = {"model": model_name(base_id, adapter), "messages": messages, "max_tokens": 5, "temperature": 0,
              "logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}  # fmt: skip
    answer = client.chat.completions.create(**fields)
    [choice] = answer.choices
    assert choice.message.content == ref.decode(generated)
    rows = ref.logprobs(prompt_ids + generated, adapter)[len(prompt_ids) - 1 :]
    content = choice.logprobs.content
    assert [e.token for e in content] == [ref.token(t) for t in generated]
    for entry, token, row in zip(content, generated, rows, strict=False):
        assert math.isclose(entry.logprob, float(row[token]), abs_tol=ATOL)
        assert entry.bytes == list(entry.token.encode())
        values, ids = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [ref.token(int(i)) for i in ids]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([float(v) for v in values], abs=ATOL)
    chunks = list(client.chat.completions.create(stream=True, **fields))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=ATOL)
    plain = client.chat.completions.create(**{**fields, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
    raw = {"model": fields["model"], "messages": messages, "logprobs": False, "top_logprobs": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=raw, timeout=30)
    assert r.status_code == 422 and "top_logprobs" in r.text  # alternatives of log-probabilities not asked for


def _by_index(chunks) -> dict[int, list]:
    out: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            out.setdefault(choice.index, []).append(choice)
    return out


def test_streaming_batches_n_echo_and_logprobs(server, base_id, client) -> None:
    fields = {"model": ADAPTER, "prompt": [PROMPT, "hello"], "max_tokens": 6, "temperature": 0.9, "seed": 3, "n": 2,
              "echo": True, "logprobs": 2, "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = client.completions.create(**fields)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **fields))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    parts = _by_index(chunks[:-1])
    assert sorted(parts) == [0, 1, 2, 3]
    for index, choice in enumerate(whole.choices):
        streamed = parts[index]
        assert "".join(c.text for c in streamed) == choice.text
        assert [c.finish_reason for c in streamed][-1] == choice.finish_reason == "length"
        tokens = [t for c in streamed if c.logprobs for t in c.logprobs.tokens]
        offsets = [t for c in streamed if c.logprobs for t in c.logprobs.text_offset]
        values = [t for c in streamed if c.logprobs for t in c.logprobs.token_logprobs]
        assert tokens == choice.logprobs.tokens and offsets == choice.logprobs.text_offset
        assert values[0] is None and values[1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=ATOL)

    chat = {"model": ADAPTER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 3, "seed": 1,
            "temperature": 1.0, "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole_chat = client.chat.completions.create(**chat)
    chat_chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat))
    parts = _by_index(chat_chunks[:-1])
    for index, choice in enumerate(whole_chat.choices):
        assert parts[index][0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in parts[index]) == choice.message.content
        assert parts[index][-1].finish_reason == "length"
    assert chat_chunks[-1].usage.completion_tokens == whole_chat.usage.completion_tokens == 15


def test_a_client_that_leaves_cancels_every_choice(server, base_id) -> None:
    url = server.url
    wait_for(lambda: metric(url, "lora_running_requests") == 0, 10.0)
    before = metric(url, "lora_requests_total", outcome="cancelled")
    body = {"model": ADAPTER, "prompt": [PROMPT, "hello"], "n": 2, "max_tokens": 200, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
        assert s.status_code == 200
        lines = s.iter_lines()  # held: dropping the iterator would close the connection
        next(line for line in lines if line.startswith("data: "))
    wait_for(lambda: metric(url, "lora_requests_total", outcome="cancelled") == before + 4, 5.0)
    wait_for(lambda: metric(url, "lora_running_requests") == 0, 3.0)
    assert metric(url, "lora_requests_total", outcome="cancelled") == before + 4


@pytest.mark.parametrize("adapter", MODELS)
def test_generate_logprobs_and_prompt_scoring(server, base_id, ref, adapter) -> None:
    prompt_ids = ref.encode(PROMPT)
    generated = ref.greedy(prompt_ids, adapter, 4)
    body = {"adapter": None if adapter is None else ADAPTER, "prompt": PROMPT, "max_new_tokens": 4, "ignore_eos": True,
            "logprobs": 2, "prompt_logprobs": 3}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    rows = ref.logprobs(prompt_ids + generated, adapter)
    assert [e["id"] for e in answer["logprobs"]] == generated
    for entry, token, row in zip(answer["logprobs"], generated, rows[len(prompt_ids) - 1 :], strict=False):
        assert entry["text"] == ref.token(token) and math.isclose(entry["logprob"], float(row[token]), abs_tol=ATOL)
        assert [t["id"] for t in entry["top"]] == row.topk(2).indices.tolist()
    prompt = answer["prompt_logprobs"]
    assert prompt[0] is None and [e["id"] for e in prompt[1:]] == prompt_ids[1:]
    for i in range(1, len(prompt_ids)):
        assert math.isclose(prompt[i]["logprob"], float(rows[i - 1, prompt_ids[i]]), abs_tol=ATOL)
        assert [t["logprob"] for t in prompt[i]["top"]] == pytest.approx(rows[i - 1].topk(3).values.tolist(), abs=ATOL)

    with httpx.stream("POST", f"{server.url}/v1/generate", json={**body, "stream": True}, timeout=60) as s:
        events = sse_events(s)
    tokens = [e["token"] for e in events if isinstance(e, dict) and "token" in e]
    assert [t["id"] for t in tokens] == generated
    assert [t["logprob"] for t in tokens] == pytest.approx([e["logprob"] for e in answer["logprobs"]], abs=ATOL)
    streamed_prompt = events[-2]["prompt_logprobs"]
    assert streamed_prompt[0] is None and [e["id"] for e in streamed_prompt[1:]] == prompt_ids[1:]
    assert [e["logprob"] for e in streamed_prompt[1:]] == pytest.approx([e["logprob"] for e in prompt[1:]], abs=ATOL)

    score = {**body, "max_new_tokens": 0, "logprobs": None}
    scored = httpx.post(f"{server.url}/v1/generate", json=score, timeout=60).json()
    assert scored["text"] == "" and scored["usage"]["completion_tokens"] == 0 and scored["finish_reason"] == "length"
    assert [e and e["id"] for e in scored["prompt_logprobs"]] == [None, *prompt_ids[1:]]
    r = httpx.post(f"{server.url}/v1/generate", json={**score, "prompt_logprobs": None}, timeout=60)
    assert r.status_code == 422  # generating nothing and scoring nothing


@pytest.mark.parametrize(
    ("prompt", "status", "named"),
    [
        ([], 422, "prompt"),
        ([[]], 422, "prompt"),
        ([""], 422, "no tokens"),
        (["a"] * 65, 422, "prompt"),
        ([[5, 6], [7, 10**6]], 400, "prompt[1]"),
        ([-1], 422, "prompt"),
        ([[5], "a"], 422, "prompt"),  # one kind of prompt per request
    ],
)
def test_prompt_forms_refused(server, base_id, prompt, status, named) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": base_id, "prompt": prompt, "max_tokens": 1},
                   timeout=30)  # fmt: skip
    assert r.status_code == status and named in r.json()["error"]["message"], r.text


def test_a_waiting_client_that_leaves_cancels_every_choice(server, base_id) -> None:
    """Not streaming: the answer is awaited for all choices at once, and a disconnect cancels them all."""
    url = server.url
    wait_for(lambda: metric(url, "lora_running_requests") == 0, 10.0)
    before = metric(url, "lora_requests_total", outcome="cancelled")
    body = json.dumps({"model": ADAPTER, "prompt": PROMPT, "n": 3, "max_tokens": 200, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        wait_for(lambda: metric(url, "lora_running_requests") == 3, 10.0)
    wait_for(lambda: metric(url, "lora_requests_total", outcome="cancelled") == before + 3, 5.0)
    wait_for(lambda: metric(url, "lora_running_requests") == 0, 3.0)
