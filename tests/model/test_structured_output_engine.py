"""Structured output through the engine on the tiny random model: whatever the (random) model prefers, the output
parses and validates (``jsonschema_rs``), matches the regex (``re.fullmatch``) or is one of the choices, and ends with
EOS; requests without a grammar in the same batches produce exactly the tokens they produce alone."""

import json
import re
import time
from pathlib import Path

import jsonschema_rs
import pytest
from transformers import AutoTokenizer

from server.engine.engine import Engine, EngineConfig
from server.engine.handle import RequestHandle, RequestResult
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from server.engine.structured_output import CompiledGrammar, GrammarCompiler, StructuredOutputSpec
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "status": {"enum": ["open", "closed", "pending"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"admin": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
            "required": ["admin", "level"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "status", "count", "owner"],
    "additionalProperties": False,
}
PATTERN = r"[a-z]{2,5}-[0-9]{2}"
CHOICES = ("sea captain", "pirate", "treasure map", "no")
PROMPTS = [[5, 17, 42, 99], [300, 12, 7], [44, 45, 46, 47, 48, 49], [150]]


def no_adapters(name: str) -> Path:
    raise KeyError(name)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    model_dir = tiny_model_dir("llama")
    model = LoraModel(load_base_model(model_dir), num_slots=1, max_rank=8)
    config = EngineConfig(max_batch_size=12, max_seq_len=320, max_tokens_per_step=96, cpu_slots=1)
    return Engine(model, AutoTokenizer.from_pretrained(model_dir), no_adapters, config)


@pytest.fixture(scope="module")
def compiler(engine: Engine) -> GrammarCompiler:
    return GrammarCompiler(engine.tokenizer, engine.runner.vocab_size, engine.outputs.eos_ids)


def run(engine: Engine, handles: list[RequestHandle]) -> list[RequestResult]:
    for _ in range(10_000):
        if not engine.has_work():
            return [h.result() for h in handles]
        if engine.step() == 0:
            time.sleep(0.001)
    raise AssertionError("engine did not finish")


def greedy(n: int = 250) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


def sampled(seed: int, n: int = 250) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed)


def submit_all(engine: Engine, grammar: CompiledGrammar | None, params: list[SamplingParams]) -> list[RequestHandle]:
    return [engine.submit(PROMPTS[i % len(PROMPTS)], None, p, grammar=grammar) for i, p in enumerate(params)]


def test_json_schema_outputs_parse_and_validate(engine, compiler) -> None:
    grammar = compiler.compile(StructuredOutputSpec("json_schema", json.dumps(SCHEMA)))
    params = [greedy(), *(sampled(seed) for seed in range(5))]
    results = run(engine, submit_all(engine, grammar, params))
    for result in results:
        assert result.finish_reason == FinishReason.EOS, (result.finish_reason, result.error, result.text)
        jsonschema_rs.validate(SCHEMA, json.loads(result.text))
    assert len({r.text for r in results}) > 1  # the draws differ: the grammar leaves the model real choices


def test_json_object_output_is_an_object(engine, compiler) -> None:
    grammar = compiler.compile(StructuredOutputSpec("json_object"))
    results = run(engine, submit_all(engine, grammar, [greedy(), sampled(3), sampled(4)]))
    finished = [r for r in results if r.finish_reason == FinishReason.EOS]
    assert finished, [(r.finish_reason, r.text) for r in results]  # an unbounded object may still hit the length cap
    for result in results:
        assert result.finish_reason in (FinishReason.EOS, FinishReason.LENGTH), result.error
    for result in finished:
        assert isinstance(json.loads(result.text), dict)


def test_regex_and_choice_outputs_match(engine, compiler) -> None:
    regex = compiler.compile(StructuredOutputSpec("regex", PATTERN))
    choice = compiler.compile(StructuredOutputSpec("choice", CHOICES))
    params = [greedy(40), sampled(1, 40), sampled(2, 40), sampled(7, 40)]
    handles = submit_all(engine, regex, params) + submit_all(engine, choice, params)
    results = run(engine, handles)
    for result in results[: len(params)]:
        assert result.finish_reason == FinishReason.EOS and re.fullmatch(PATTERN, result.text), result.text
    for result in results[len(params) :]:
        assert result.finish_reason == FinishReason.EOS and result.text in CHOICES, result.text


def test_n_sequences_of_one_request_each_follow_the_grammar(engine, compiler) -> None:
    grammar = compiler.compile(StructuredOutputSpec("json_schema", json.dumps(SCHEMA)))
    handles = engine.submit_group(PROMPTS[0], None, [sampled(10 + i) for i in range(3)], grammar=grammar)
    for result in run(engine, handles):
        assert result.finish_reason == FinishReason.EOS
        jsonschema_rs.validate(SCHEMA, json.loads(result.text))


def test_rows_without_grammar_produce_the_tokens_they_produce_alone(engine, compiler) -> None:
    free = [SamplingParams(max_new_tokens=30, ignore_eos=True), sampled(21, 30), sampled(22, 30)]
    alone = [r.token_ids for r in run(engine, submit_all(engine, None, free))]
    schema = compiler.compile(StructuredOutputSpec("json_schema", json.dumps(SCHEMA)))
    choice = compiler.compile(StructuredOutputSpec("choice", CHOICES))
    mixed = submit_all(engine, schema, [greedy(), sampled(5)])
    together = submit_all(engine, None, free)
    mixed += submit_all(engine, choice, [sampled(6, 40)])
    results = run(engine, mixed + together)
    assert [r.token_ids for r in results[len(mixed) :]] == alone
    assert all(r.finish_reason == FinishReason.EOS for r in results[: len(mixed)])
