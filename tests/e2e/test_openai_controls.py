"""Issue 14, items 5 and 6 through the official ``openai`` client and ``/v1/generate`` on a real server: penalties
equal to a reference (Hugging Face's repetition-penalty processor; plain Python for OpenAI's presence and frequency
penalties and for logit_bias), min_tokens, stop_token_ids, skip_special_tokens, top_k, user; structured output in
every spelling (OpenAI's response_format, vLLM's guided_* and structured_outputs, our structured_output) answering
text that parses and validates."""

import json
import re
from typing import Literal

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from pydantic import BaseModel, ConfigDict
from transformers import RepetitionPenaltyLogitsProcessor

from tests.e2e.openai_reference import LmReference
from tests.helpers.http_client import sse_events, upload

PROMPT = "the customer asked about a refund"
ADAPTER = "controls-a0"
EOS = 2  # the tiny tokenizer's </s>, the model's end-of-sequence token
IM_START = 3  # <|im_start|>, a special token
STEPS = 12


class Verdict(BaseModel):
    """The schema of the structured-output tests (pydantic validates the answers against it, as a client would)."""

    model_config = ConfigDict(extra="forbid")
    answer: Literal["yes", "no"]
    ok: bool


SCHEMA = Verdict.model_json_schema()


@pytest.fixture(scope="module")
def ref(tiny_model_dir, tiny_adapters) -> LmReference:
    return LmReference(tiny_model_dir("llama"), tiny_adapters("llama")[:1])


@pytest.fixture(scope="module")
def client(server, tiny_adapters) -> OpenAI:
    assert upload(server.url, ADAPTER, tiny_adapters("llama")[0]).status_code == 201
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def generated_ids(server, **fields: object) -> list[int]:
    body = {"adapter": ADAPTER, "prompt": PROMPT, "max_new_tokens": STEPS, "ignore_eos": True, "logprobs": 0, **fields}
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [entry["id"] for entry in r.json()["logprobs"]]


def repetition(penalty: float):
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    return lambda logits, prompt, out: hf(torch.tensor([[*prompt, *out]]), logits[None])[0]


def frequency(penalty: float):
    def process(logits, prompt, out):
        for token in set(out):
            logits[token] -= penalty * out.count(token)
        return logits

    return process


def presence(penalty: float):
    def process(logits, prompt, out):
        for token in set(out):
            logits[token] -= penalty
        return logits

    return process


def bias(entries: dict[int, float]):
    def process(logits, prompt, out):
        for token, value in entries.items():
            logits[token] += value
        return logits

    return process


@pytest.mark.parametrize(
    ("fields", "openai_fields", "process"),
    [
        ({"repetition_penalty": 1.8}, {"extra_body": {"repetition_penalty": 1.8}}, repetition(1.8)),
        ({"frequency_penalty": 1.5}, {"frequency_penalty": 1.5}, frequency(1.5)),
        ({"presence_penalty": 2.0}, {"presence_penalty": 2.0}, presence(2.0)),
        ({"presence_penalty": -2.0}, {"presence_penalty": -2.0}, presence(-2.0)),
    ],
)
def test_penalties_equal_the_reference(server, client, ref, fields, openai_fields, process) -> None:
    prompt_ids = ref.encode(PROMPT)
    expected = ref.greedy(prompt_ids, 0, STEPS, process)
    assert expected != ref.greedy(prompt_ids, 0, STEPS)  # the penalty changes this answer: the test can fail
    assert generated_ids(server, **fields) == expected
    kwargs = dict(openai_fields)
    extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}  # the client's own fields, and vLLM's extensions
    answer = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=STEPS, temperature=0, extra_body=extra,
                                       **kwargs)  # fmt: skip
    assert answer.choices[0].text == ref.decode(expected)


def test_logit_bias(server, client, ref) -> None:
    prompt_ids = ref.encode(PROMPT)
    plain = ref.greedy(prompt_ids, 0, STEPS)
    banned = {plain[0]: -100.0, plain[1]: -100.0}
    expected = ref.greedy(prompt_ids, 0, STEPS, bias(banned))
    assert expected[0] != plain[0]
    assert generated_ids(server, logit_bias={str(t): b for t, b in banned.items()}) == expected
    answer = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=STEPS, temperature=0,
                                       logit_bias={str(t): b for t, b in banned.items()},
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert answer.choices[0].text == ref.decode(expected)
    forced = client.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            temperature=1.0, logit_bias={"65": 100}, seed=3)  # fmt: skip
    assert forced.choices[0].message.content == ref.decode([65] * 4)
    for bad in ({"999999": 1}, {"-1": 1}, {"x": 1}, {"5": 101}):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": ADAPTER, "prompt": "hi", "logit_bias": bad})
        assert r.status_code in (400, 422) and "logit_bias" in r.text, r.text


def test_min_tokens_stop_token_ids_and_skip_special_tokens(server, client, ref) -> None:
    prompt_ids = ref.encode(PROMPT)
    eager = {"logit_bias": {str(EOS): 100}}  # the model would end at once
    first = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=8, temperature=0, **eager)
    assert first.choices[0].text == "" and first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens == 1
    held = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                     extra_body={"min_tokens": 3}, **eager)  # fmt: skip
    no_eos = ref.greedy(prompt_ids, 0, 3, bias({EOS: -float("inf")}))
    assert held.choices[0].text == ref.decode(no_eos) and held.choices[0].finish_reason == "stop"
    assert held.choices[0].logprobs.tokens == [ref.token(t) for t in [*no_eos, EOS]]  # EOS's entry is there
    assert held.usage.completion_tokens == 4

    plain = ref.greedy(prompt_ids, 0, STEPS)
    j = next(i for i in range(1, STEPS) if plain[i] not in plain[:i])
    stopped = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=STEPS, temperature=0,
                                        extra_body={"stop_token_ids": [plain[j]], "ignore_eos": True})  # fmt: skip
    assert stopped.choices[0].text == ref.decode(plain[:j]) and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == j + 1

    special = {"logit_bias": {str(IM_START): 100}}
    kept = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=2, temperature=0,
                                     extra_body={"skip_special_tokens": False}, **special)  # fmt: skip
    assert kept.choices[0].text == "<|im_start|><|im_start|>"
    skipped = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=2, temperature=0, **special)
    assert skipped.choices[0].text == ""
    body = {"prompt": PROMPT, "max_new_tokens": 2, "skip_special_tokens": False, "logit_bias": {str(IM_START): 100}}
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.json()["text"] == "<|im_start|><|im_start|>"
    body = {"adapter": ADAPTER, "prompt": PROMPT, "max_new_tokens": STEPS, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/generate", json={**body, "stop_token_ids": [plain[j]]}, timeout=60).json()
    assert r["text"] == ref.decode(plain[:j]) and r["finish_reason"] == "stop"
    r = httpx.post(f"{server.url}/v1/generate", json={**body, "min_tokens": 3, "ignore_eos": False, **eager},
                   timeout=60).json()  # fmt: skip
    assert r["text"] == ref.decode(no_eos) and r["finish_reason"] == "eos" and r["usage"]["completion_tokens"] == 4


def test_top_k_and_user(server, client, ref) -> None:
    greedy = ref.decode(ref.greedy(ref.encode(PROMPT), 0, STEPS))
    answer = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=STEPS, temperature=1.0, seed=7,
                                       user="team-a", extra_body={"top_k": 1, "ignore_eos": True})  # fmt: skip
    assert answer.choices[0].text == greedy  # sampling from the single most probable token
    filtered = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=2, temperature=1.0, logprobs=2,
                                         extra_body={"top_k": 1})  # fmt: skip
    for value, top in zip(filtered.choices[0].logprobs.token_logprobs, filtered.choices[0].logprobs.top_logprobs,
                          strict=True):  # fmt: skip
        assert value == 0.0 and sorted(top.values()) == [-9999.0, 0.0]  # the filtered-out: minus infinity
    for off in (0, -1):  # vLLM's "no top-k": a seeded sample over the whole vocabulary, as without the field
        fields = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": STEPS, "temperature": 1.0, "seed": 7}
        with_off = client.completions.create(**fields, extra_body={"top_k": off, "ignore_eos": True})
        without = client.completions.create(**fields, extra_body={"ignore_eos": True})
        assert with_off.choices[0].text == without.choices[0].text


# ---- structured output ---------------------------------------------------------------------------------------------


def test_json_schema_answers_validate(server, client) -> None:
    messages = [{"role": "user", "content": "is the refund ok?"}]
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=64, temperature=0,
                                          response_format=response_format)  # fmt: skip
    assert chat.choices[0].finish_reason == "stop"
    Verdict.model_validate_json(chat.choices[0].message.content)
    sampled = client.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=64, temperature=1.0, n=3,
                                             seed=5, response_format=response_format)  # fmt: skip
    for choice in sampled.choices:  # each choice follows the grammar with its own state
        Verdict.model_validate_json(choice.message.content)
    completion = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=64, temperature=0,
                                           extra_body={"response_format": response_format})  # fmt: skip
    Verdict.model_validate_json(completion.choices[0].text)
    for spelling in ({"guided_json": SCHEMA}, {"guided_json": json.dumps(SCHEMA)},
                     {"structured_outputs": {"json": SCHEMA}}):  # fmt: skip
        answer = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=64, temperature=0.7, seed=1,
                                           extra_body=spelling)  # fmt: skip
        Verdict.model_validate_json(answer.choices[0].text)
    body = {"adapter": ADAPTER, "prompt": PROMPT, "max_new_tokens": 64, "structured_output": {"type": "json_schema",
            "schema": SCHEMA}}  # fmt: skip
    Verdict.model_validate_json(httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).json()["text"])


def test_json_object_regex_and_choice(server, client) -> None:
    chat = {"model": ADAPTER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 96, "temperature": 0}
    answer = client.chat.completions.create(**chat, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    text = client.chat.completions.create(**chat, response_format={"type": "text"}).choices[0].message.content
    assert text == client.chat.completions.create(**chat).choices[0].message.content  # "text": free text
    pattern = "[a-c]{3}-[0-9]{2}"
    for spelling in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        text = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=2,
                                         extra_body=spelling).choices[0].text  # fmt: skip
        assert re.fullmatch(pattern, text), text
    choices = ["refund approved", "refund denied", "escalate"]
    for spelling in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        got = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=4, n=4,
                                        extra_body=spelling)  # fmt: skip
        assert all(c.text in choices for c in got.choices), [c.text for c in got.choices]
    streamed = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                         extra_body={"guided_choice": choices})  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) in choices
    for output in ({"type": "regex", "pattern": pattern}, {"type": "choice", "choices": choices},
                   {"type": "json_object"}):  # fmt: skip
        body = {"prompt": PROMPT, "max_new_tokens": 96, "structured_output": output}
        with httpx.stream("POST", f"{server.url}/v1/generate", json={**body, "stream": True}, timeout=60) as s:
            text = "".join(e["token"]["text"] for e in sse_events(s) if isinstance(e, dict) and "token" in e)
        if output["type"] == "regex":
            assert re.fullmatch(pattern, text), text
        elif output["type"] == "choice":
            assert text in choices
        else:
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "fields",
    [
        {"guided_regex": "a+", "guided_choice": ["a"]},  # two ways at once
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
        {"structured_outputs": {"regex": "a+", "choice": ["a"]}},
        {"structured_outputs": {"json_object": False}},  # asks for nothing
        {"guided_json": "{not json"},
        {"guided_regex": "(unclosed"},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
    ],
)
def test_bad_structured_output_requests_answer_400(server, client, fields) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": ADAPTER, "prompt": "hi", "max_tokens": 4, **fields},
                   timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request"


def test_stop_top_p_and_fields_still_refused(server, client, ref) -> None:
    greedy = ref.decode(ref.greedy(ref.encode(PROMPT), 0, STEPS))
    stop = next(greedy[i : i + 2] for i in range(1, len(greedy) - 1) if "\ufffd" not in greedy[i : i + 2])
    cut = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=STEPS, temperature=1.0, top_p=1e-9,
                                    seed=11, stop=[stop], extra_body={"ignore_eos": True})  # fmt: skip
    assert cut.choices[0].text == greedy[: greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    hi = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=ADAPTER, messages=hi, temperature=0, max_completion_tokens=3,
                                          max_tokens=9, extra_body={"ignore_eos": True})  # fmt: skip
    assert chat.usage.completion_tokens == 3  # max_completion_tokens wins

    refused = [
        lambda: client.completions.create(model=ADAPTER, prompt="hi", suffix="!"),
        lambda: client.completions.create(model=ADAPTER, prompt="hi", n=1, best_of=2),
        lambda: client.chat.completions.create(
            model=ADAPTER, messages=hi, tools=[{"type": "function", "function": {"name": "f"}}]
        ),
    ]
    for call, named in zip(refused, ("suffix", "best_of", "tools"), strict=True):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.status_code == 400 and named in str(info.value)
