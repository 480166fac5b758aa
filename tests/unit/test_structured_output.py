"""Grammars of structured output against references nobody here wrote: ``jsonschema_rs`` for JSON schemas, Python's
``re.fullmatch`` for regexes, plain string comparison for choices, and a plain-Python bit unpacking for the masks."""

import asyncio
import json
import math
import random
import re
from types import SimpleNamespace

import jsonschema_rs
import pytest
import torch

from loadtests.common.factories import build_tokenizer
from server.api.errors import ApiError
from server.api.grammar import compile_grammar
from server.engine.structured_output import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    StructuredOutputSpec,
    apply_grammar_masks,
)

EOS = 2  # the tiny tokenizer's </s>
VOCAB = 400  # logits wider than the tokenizer's 384 entries, as a padded lm_head is

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "status": {"enum": ["open", "closed"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"login": {"type": "string"}, "admin": {"type": "boolean"}},
            "required": ["login", "admin"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "status", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB)


def schema_spec(schema: object) -> StructuredOutputSpec:
    return StructuredOutputSpec("json_schema", json.dumps(schema))


def accepts(grammar: CompiledGrammar, tokenizer, text: str, end: bool = True) -> bool:
    """Does a fresh matcher take ``text`` (as the tokenizer encodes it), then EOS when ``end``?"""
    matcher = grammar.matcher()
    ids = tokenizer.encode(text, add_special_tokens=False) + ([EOS] if end else [])
    return all(matcher.accept(t) for t in ids)


def allowed_tokens(matcher: GrammarMatcher) -> set[int]:
    """The tokens the matcher allows next, unpacked from its bitmask in plain Python."""
    bitmask = torch.zeros(1, matcher.mask_words, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    words = [w & 0xFFFFFFFF for w in bitmask[0].tolist()]
    return {t for t in range(32 * len(words)) if words[t // 32] >> (t % 32) & 1}


def random_instance(rng: random.Random) -> dict:
    """Mostly valid, sometimes not, always written as the grammar writes JSON (keys in schema order, json.dumps)."""
    value: dict = {
        "id": rng.choice([0, 7, 123, -5]),
        "status": rng.choice(["open", "closed", "other"]),
        "tags": [rng.choice(["a", "bb", "c d", 'q"uote']) for _ in range(rng.randint(0, 4))],
        "owner": {"login": rng.choice(["x", "root", ""]), "admin": rng.choice([True, False, "yes"])},
    }
    if rng.random() < 0.2:
        del value["tags"]
    if rng.random() < 0.1:
        del value["owner"]["admin"]
    if rng.random() < 0.1:
        value["extra"] = 1
    return value


def test_json_schema_accepts_exactly_the_valid_instances(compiler, tokenizer) -> None:
    grammar = compiler.compile(schema_spec(SCHEMA))
    rng = random.Random(0)
    outcomes = set()
    for _ in range(60):
        value = random_instance(rng)
        valid = jsonschema_rs.is_valid(SCHEMA, value)
        assert accepts(grammar, tokenizer, json.dumps(value)) == valid, json.dumps(value)
        outcomes.add(valid)
    assert outcomes == {True, False}


def test_json_text_must_be_complete_before_eos(compiler, tokenizer) -> None:
    grammar = compiler.compile(schema_spec(SCHEMA))
    text = json.dumps({"id": 1, "status": "open", "owner": {"login": "a", "admin": True}})
    assert not accepts(grammar, tokenizer, text[:-1])  # EOS before the closing brace
    assert not accepts(grammar, tokenizer, text + " ")  # nothing but EOS after it
    matcher = grammar.matcher()
    assert all(matcher.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))
    assert matcher.is_finished() and allowed_tokens(matcher) == {EOS}
    assert matcher.accept(EOS)


def test_json_object_takes_any_object_and_nothing_else(compiler, tokenizer) -> None:
    grammar = compiler.compile(StructuredOutputSpec("json_object"))
    for value in ({}, {"a": [1, 2.5, None, {"b": "c"}]}, {"k": True, "x": "y z"}):
        assert accepts(grammar, tokenizer, json.dumps(value))
    for text in ("[1, 2]", '"text"', "12", "{", '{"a" 1}'):
        assert not accepts(grammar, tokenizer, text)


def test_regex_accepts_what_fullmatch_accepts(compiler, tokenizer) -> None:
    pattern = r"[a-z]{2,4}-[0-9]+(\.[0-9]{2})?"
    grammar = compiler.compile(StructuredOutputSpec("regex", pattern))
    for text in ("ab-1", "abcd-2024.05", "abcde-1", "a-1", "ab-", "ab-1.5", "ab-12.34", "AB-1", "ab-1 "):
        assert accepts(grammar, tokenizer, text) == bool(re.fullmatch(pattern, text)), text


def test_choice_accepts_only_the_choices(compiler, tokenizer) -> None:
    choices = ("yes", "no", "maybe not", 'say "hi"')
    grammar = compiler.compile(StructuredOutputSpec("choice", choices))
    for text in (*choices, "ye", "yess", "no ", "maybe", "", "say hi"):
        assert accepts(grammar, tokenizer, text) == (text in choices), text
    # At the start, the allowed tokens are exactly those that begin some choice.
    expected = {
        t for t in range(len(tokenizer)) if (s := tokenizer.decode([t])) and any(c.startswith(s) for c in choices)
    }
    assert allowed_tokens(grammar.matcher()) == expected


def test_masks_match_the_bitmask_and_leave_other_rows_untouched(compiler, tokenizer) -> None:
    grammars = [compiler.compile(schema_spec(SCHEMA)), compiler.compile(StructuredOutputSpec("choice", ("yes", "no")))]
    prefix = tokenizer.encode('{"id": 3, "status": "', add_special_tokens=False)
    mid = grammars[0].matcher()
    assert all(mid.accept(t) for t in prefix)
    matchers = [None, grammars[0].matcher(), None, mid, grammars[1].matcher(), None]
    logits = torch.randn(len(matchers), VOCAB)
    before = logits.clone()
    apply_grammar_masks(logits, matchers)
    for i, matcher in enumerate(matchers):
        if matcher is None:
            assert torch.equal(logits[i], before[i])
            continue
        allowed = allowed_tokens(matcher)
        assert allowed and max(allowed) < len(tokenizer)  # the padded columns are never allowed
        expected = torch.tensor([before[i, t] if t in allowed else -math.inf for t in range(VOCAB)])
        assert torch.equal(logits[i], expected)
    assert {tokenizer.decode([t]) for t in allowed_tokens(mid)} <= {"o", "op", "ope", "open", "c", "cl", "clo",
                                                                     "clos", "close", "closed"}  # fmt: skip


def test_masks_reuse_their_buffers_across_batch_sizes(compiler) -> None:
    grammar = compiler.compile(StructuredOutputSpec("json_object"))
    for n in (1, 12, 3, 20):
        logits = torch.randn(n + 1, VOCAB)
        apply_grammar_masks(logits, [None] + [grammar.matcher() for _ in range(n)])
        allowed = logits[1:].isfinite()
        assert allowed.sum(dim=1).tolist() == [1] * n  # only "{" opens an object
        assert torch.isfinite(logits[0]).all()


def test_a_batch_without_grammars_is_not_touched() -> None:
    logits = torch.zeros(3, VOCAB, requires_grad=True)  # any in-place write to a leaf that needs grad would raise
    apply_grammar_masks(logits, [None, None, None])
    apply_grammar_masks(logits[:0], [])


def test_compiled_grammars_are_cached_in_a_bounded_lru(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, cache_size=2)
    a, b, c = (StructuredOutputSpec("choice", (w,)) for w in ("a", "b", "c"))
    first = compiler.compile(a)
    assert compiler.compile(StructuredOutputSpec("choice", ("a",))) is first
    compiler.compile(b)
    compiler.compile(a)  # a is the most recent now
    compiler.compile(c)  # evicts b
    assert compiler.cached() == 2 and compiler.compile(a) is first
    assert compiler.compile(b) is not None and compiler.cached() == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutputSpec("json_schema", "{not json"), "not valid JSON"),
        (StructuredOutputSpec("json_schema", "[1, 2]"), "must be a JSON object"),
        (schema_spec({"type": "strang"}), "strang"),
        (schema_spec({"type": "string", "not": {"const": "x"}}), "not"),
        (schema_spec({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (schema_spec({"type": "string", "format": "bogus"}), "bogus"),
        (schema_spec({"$ref": "#/$defs/missing"}), "missing"),
        (schema_spec({"type": "object", "x-guidance": {"lenient": True}}), "x-guidance"),
        (StructuredOutputSpec("json_object", "{}"), "no value"),
        (StructuredOutputSpec("regex", "(ab"), "unclosed group"),
        (StructuredOutputSpec("regex", "a(?=b)"), "look-around"),
        (StructuredOutputSpec("choice", ()), "non-empty"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(compiler, spec, message) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        compiler.compile(spec)


def test_end_of_sequence_ids(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, eos_ids=[2, 4])
    matcher = compiler.compile(StructuredOutputSpec("choice", ("no",))).matcher()
    assert all(matcher.accept(t) for t in tokenizer.encode("no", add_special_tokens=False))
    assert allowed_tokens(matcher) == {2, 4}
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    for silent in (GrammarCompiler(no_eos, VOCAB), GrammarCompiler(tokenizer, VOCAB, eos_ids=())):
        with pytest.raises(GrammarError, match="end-of-sequence"):
            silent.compile(StructuredOutputSpec("json_object"))


def test_out_of_range_tokens_are_refused(compiler) -> None:
    grammar = compiler.compile(StructuredOutputSpec("json_object"))
    for token in (-1, VOCAB, 10**9):
        assert not grammar.matcher().accept(token)


def test_compile_grammar_maps_errors_to_400(tokenizer) -> None:
    engine = SimpleNamespace(vocab_size=VOCAB, eos_ids=frozenset({2}))
    service = SimpleNamespace(tokenizer=tokenizer, engine=engine)

    async def run() -> None:
        spec = StructuredOutputSpec("regex", "[0-9]+")
        first, second = await asyncio.gather(compile_grammar(service, spec), compile_grammar(service, spec))  # type: ignore[arg-type]
        assert isinstance(first, CompiledGrammar) and first.matcher().accept(tokenizer.convert_tokens_to_ids("7"))
        assert second is first  # compiled at once by two threads: both get the one the cache kept
        assert await compile_grammar(service, spec) is first  # type: ignore[arg-type]
        with pytest.raises(ApiError) as info:
            await compile_grammar(service, schema_spec({"not": {}}))  # type: ignore[arg-type]
        assert (info.value.status, info.value.type) == (400, "invalid_request") and "not" in info.value.message

    asyncio.run(run())


def test_a_spec_compiled_by_two_threads_at_once_gives_both_the_cached_grammar(tokenizer, monkeypatch) -> None:
    import threading

    fresh = GrammarCompiler(tokenizer, VOCAB)
    compile_once = fresh._compile
    both_compiling = threading.Barrier(2)

    def slow(spec: StructuredOutputSpec) -> CompiledGrammar:
        both_compiling.wait(timeout=10)  # neither finds the other's result in the cache
        return compile_once(spec)

    monkeypatch.setattr(fresh, "_compile", slow)
    spec = StructuredOutputSpec("regex", "[0-9]+")
    results: list[CompiledGrammar] = []
    threads = [threading.Thread(target=lambda: results.append(fresh.compile(spec))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 2 and results[0] is results[1] and fresh.cached() == 1
